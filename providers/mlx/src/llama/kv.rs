//! The running sequences' keys and values: per layer one pair of device buffers
//! `[slots, kv_heads, capacity, head_dim]` shared by every sequence of the generator,
//! a sequence holding one slot. Decode steps then write all sequences' new keys with
//! one scatter and attend with one batched SDPA per layer (a length mask per row), so
//! a step's host work does not grow with the batch. The buffers grow (slots by 8,
//! tokens by 256, copying what they hold) and are released when no sequence is left.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_core::{DType, Result, SequenceCache, SlotIds};

use crate::array::Array;

const SLOT_CHUNK: usize = 8;
const TOKEN_CHUNK: usize = 256;

/// The shared buffers and which slots are taken.
#[derive(Default)]
pub(super) struct Pool {
    /// Per layer, keys and values; empty until the first step.
    pub(super) layers: Vec<(Array, Array)>,
    slots: usize,
    capacity: usize,
    ids: SlotIds,
    /// Bumped when a failed step's buffers are thrown away: a sequence written before
    /// that lost its keys.
    pub(super) epoch: u64,
    /// The decode step queued on the device ahead of the runtime's call for it
    /// (`Llama::stepped`).
    pub(super) ahead: Option<Ahead>,
}

/// A decode step queued before the runtime asked for it: each greedy sequence of the
/// step before fed its picked token. Its keys and values are already in the buffers
/// (written at positions no sequence reads before it writes them itself, so a step that
/// goes unused leaves nothing wrong behind).
pub(super) struct Ahead {
    /// Per row: the sequence's serial, the position of the token it was fed, the token.
    pub(super) rows: Vec<(u64, usize, u32)>,
    /// The tokens the step picks, `[rows]` u32, queued on the device.
    pub(super) tokens: Array,
}

/// The pool behind a lock, shared by the generator and its sequences.
pub(super) type SharedPool = Arc<Mutex<Pool>>;

pub(super) fn lock(pool: &SharedPool) -> MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shape of the buffers.
pub(super) struct Geometry {
    pub(super) layers: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) dtype: DType,
}

impl Pool {
    /// Makes room for slot ids below `slots` and `tokens` tokens per slot.
    pub(super) fn reserve(&mut self, slots: usize, tokens: usize, g: &Geometry) -> Result<()> {
        if slots <= self.slots && tokens <= self.capacity && !self.layers.is_empty() {
            return Ok(());
        }
        let new_slots = slots.max(self.slots).div_ceil(SLOT_CHUNK) * SLOT_CHUNK;
        let new_capacity = tokens.max(self.capacity).div_ceil(TOKEN_CHUNK) * TOKEN_CHUNK;
        let (kv, hd) = (g.kv_heads as i32, g.head_dim as i32);
        let held = [self.slots as i32, kv, self.capacity as i32, hd];
        let grown = |old: Option<&Array>| -> Result<Array> {
            let fresh = Array::zeros(&[new_slots, g.kv_heads, new_capacity, g.head_dim], g.dtype)?;
            match old {
                Some(old) if self.slots > 0 && self.capacity > 0 => fresh.slice_update(old, &[0; 4], &held),
                _ => Ok(fresh),
            }
        };
        self.layers = (0..g.layers)
            .map(|l| {
                let old = self.layers.get(l);
                Ok((grown(old.map(|o| &o.0))?, grown(old.map(|o| &o.1))?))
            })
            .collect::<Result<_>>()?;
        self.slots = new_slots;
        self.capacity = new_capacity;
        Ok(())
    }

    /// Throws the buffers away after a failed step (they may hold its unevaluated
    /// graph); sequences written before can no longer step.
    pub(super) fn discard(&mut self) {
        self.ahead = None;
        self.layers.clear();
        self.slots = 0;
        self.capacity = 0;
        self.epoch += 1;
    }

    /// A free slot.
    pub(super) fn acquire(&mut self) -> usize {
        self.ids.acquire()
    }
}

/// A new sequence's serial: what tells a sequence from a later one in the same slot.
pub(super) fn serial() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A sequence: its slot in the pool and how many tokens it holds.
pub struct MlxCache {
    pub(super) slot: usize,
    pub(super) serial: u64,
    pub(super) len: usize,
    pub(super) bytes_per_token: u64,
    pub(super) pool: SharedPool,
    /// The pool's epoch when this sequence was last written.
    pub(super) epoch: u64,
}

impl SequenceCache for MlxCache {
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

impl Drop for MlxCache {
    fn drop(&mut self) {
        let mut pool = lock(&self.pool);
        if pool.ids.release(self.slot) {
            // Nobody left: the buffers go back to MLX, once a step queued ahead (which
            // writes them) is done — nothing is left running on the device when the
            // generator goes (a failed step's error has already been reported).
            if let Some(ahead) = pool.ahead.take() {
                let _ = crate::array::eval(&[&ahead.tokens]);
            }
            let epoch = pool.epoch;
            *pool = Pool { epoch, ..Pool::default() };
        }
    }
}
