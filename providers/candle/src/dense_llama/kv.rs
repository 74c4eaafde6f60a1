//! The running sequences' keys and values: per layer one pair of device tensors
//! `[slots, kv_heads, capacity, head_dim]` shared by every sequence of the generator,
//! a sequence holding one slot. A step writes all its rows' new keys with one in-place
//! scatter per layer and decoding rows attend with one batched product over every
//! slot (a length mask per slot), so the kernels a step launches do not grow with the
//! batch. The tensors grow (slots by 8, tokens by 256, keeping what they hold) and are
//! released when no sequence is left.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use kiln_core::{SequenceCache, SlotIds};

const SLOT_CHUNK: usize = 8;
const TOKEN_CHUNK: usize = 256;

/// The shape of the tensors.
pub(super) struct Geometry {
    pub(super) layers: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) dtype: DType,
}

/// The shared tensors and which slots are taken.
#[derive(Default)]
pub(super) struct Pool {
    /// Per layer, keys and values, each `[slots, kv_heads, capacity, head_dim]`; empty
    /// until the first step.
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) slots: usize,
    pub(super) capacity: usize,
    ids: SlotIds,
}

/// The pool behind a lock, shared by the generator and its sequences.
pub(super) type SharedPool = Arc<Mutex<Pool>>;

pub(super) fn lock(pool: &SharedPool) -> MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// Makes room for every slot handed out and `tokens` tokens per slot.
    pub(super) fn reserve(
        &mut self,
        tokens: usize,
        g: &Geometry,
        device: &Device,
    ) -> candle_core::Result<()> {
        let slots = self.ids.issued();
        if slots <= self.slots && tokens <= self.capacity && !self.layers.is_empty() {
            return Ok(());
        }
        let new_slots = slots.max(self.slots).max(1).div_ceil(SLOT_CHUNK) * SLOT_CHUNK;
        let new_capacity = tokens.max(self.capacity).max(1).div_ceil(TOKEN_CHUNK) * TOKEN_CHUNK;
        let grown = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
            match old {
                // Zeros after what each slot holds, then zero slots after the old ones.
                Some(old) => old
                    .pad_with_zeros(2, 0, new_capacity - self.capacity)?
                    .pad_with_zeros(0, 0, new_slots - self.slots)?
                    .contiguous(),
                None => Tensor::zeros((new_slots, g.kv_heads, new_capacity, g.head_dim), g.dtype, device),
            }
        };
        let layers = (0..g.layers)
            .map(|l| {
                let old = self.layers.get(l);
                Ok((grown(old.map(|o| &o.0))?, grown(old.map(|o| &o.1))?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.layers = layers;
        self.slots = new_slots;
        self.capacity = new_capacity;
        Ok(())
    }

    /// A free slot.
    pub(super) fn acquire(&mut self) -> usize {
        self.ids.acquire()
    }

    /// Gives `slot` back; when no slot is taken any more, the device memory too.
    pub(super) fn release(&mut self, slot: usize) {
        if self.ids.release(slot) {
            *self = Pool::default();
        }
    }

    /// Copies slot `from`'s keys and values into slot `to` (both within the tensors).
    pub(super) fn copy_slot(&self, from: usize, to: usize) -> candle_core::Result<()> {
        for (k, v) in &self.layers {
            for t in [k, v] {
                let rows = t.reshape((self.slots, ()))?;
                // `slice_set` takes no source that shares the destination's storage.
                rows.slice_set(&rows.narrow(0, from, 1)?.copy()?, 0, to)?;
            }
        }
        Ok(())
    }
}

/// A sequence: its slot in the pool and how many tokens it holds.
pub struct TensorCache {
    pub(super) slot: usize,
    pub(super) len: usize,
    pub(super) bytes_per_token: u64,
    pub(super) pool: SharedPool,
}

impl SequenceCache for TensorCache {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> u64 {
        self.len as u64 * self.bytes_per_token
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Drop for TensorCache {
    fn drop(&mut self) {
        lock(&self.pool).release(self.slot);
    }
}
