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

/// The heads of a layer's attention: query heads, KV heads, head size.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub q: i32,
    pub kv: i32,
    pub dim: i32,
}

/// Rows of a step that each write one token's keys and values at their own slot and
/// position of the shared buffers (decode rows; the tokens of prompts attended in
/// groups): one rotary embedding and one scatter a layer for all of them.
pub(super) struct Rows {
    /// Their rows in the step (`None`: all rows, in order).
    rows: Option<Array>,
    /// `[n]`: each row's slot (its sequence's), which its attention gathers.
    pub(super) slots: Array,
    positions: Array,
    n: i32,
}

impl Rows {
    /// Rows `rows` of the step (`None`: all, in order) at `slots` and `positions`.
    pub(super) fn new(rows: Option<&[i32]>, slots: &[i32], positions: &[i32]) -> Result<Rows> {
        Ok(Rows {
            rows: rows.map(Array::from_i32).transpose()?,
            slots: Array::from_i32(slots)?,
            positions: Array::from_i32(positions)?,
            n: slots.len() as i32,
        })
    }

    /// Their queries roped at their positions (`[n, heads, 1, dim]`), after their keys
    /// (roped) and values are written into `kbuf` / `vbuf`.
    pub(super) fn store(
        &self,
        (q, k, v): (&Array, &Array, &Array),
        (kbuf, vbuf): (&mut Array, &mut Array),
        heads: Heads,
        base: f32,
    ) -> Result<Array> {
        let (n, hd) = (self.n, heads.dim);
        let pick = |a: &Array, h: i32| -> Result<Array> {
            let rows = match &self.rows {
                Some(rows) => a.take(rows, 0)?,
                None => a.reshape(&[n, h * hd])?,
            };
            rows.reshape(&[n, 1, h, hd])?.transpose(&[0, 2, 1, 3])
        };
        let qs = pick(q, heads.q)?.rope_at(hd as usize, base, &self.positions)?;
        let ks = pick(k, heads.kv)?.rope_at(hd as usize, base, &self.positions)?;
        let update = |a: &Array| a.reshape(&[n, 1, heads.kv, 1, hd]);
        *kbuf = kbuf.scatter_rows(&self.slots, &self.positions, &update(&ks)?)?;
        *vbuf = vbuf.scatter_rows(&self.slots, &self.positions, &update(&pick(v, heads.kv)?)?)?;
        Ok(qs)
    }
}

/// The first `keys` positions of a layer's buffer `buf` for each of `slots`:
/// `[slots, kv heads, keys, dim]`, what a batched SDPA attends over.
pub(super) fn gather(buf: &Array, slots: &Array, keys: i32) -> Result<Array> {
    let shape = buf.shape();
    let (all, kv, dim) = (shape[0] as i32, shape[1] as i32, shape[3] as i32);
    buf.slice(&[0, 0, 0, 0], &[all, kv, keys, dim])?.take(slots, 0)
}

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
