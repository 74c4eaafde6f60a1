//! The prompts of a step attended together.
//!
//! Attending each prompt on its own costs about fourteen graph operations (and kernel
//! launches) a prompt a layer: 64 prompts joining at once are ~27 000 nodes for
//! SmolLM2's 30 layers, and MLX took 360–490 ms to their first tokens where candle's
//! batched kernels take 72 ms (H100, 2026-12-07). Here the prompts' new rows are roped
//! and written into their slots with one scatter, as the decode rows are, and prompts
//! of similar lengths go through one padded SDPA with a mask per prompt: a causal one
//! from each prompt's position, padding rows seeing what the prompt's last row sees (so
//! no row's softmax is over nothing). The padded rows are dropped afterwards.
//!
//! Grouping bounds the padding: prompts are taken longest first and a group takes the
//! next one while its padded rows stay within twice its real ones and its mask within
//! 4 Mi entries, so one long prompt beside many short ones does not pad them all to its
//! length, and long prompts keep MLX's causal kernel, which needs no mask.

use kiln_core::{DType, Result};

use super::Span;
use super::kv::{Heads, Rows, gather};
use crate::array::Array;

/// Prompts padded to one length and attended in one SDPA.
struct Group {
    count: i32,
    /// Rows per prompt after padding: the group's longest prompt.
    tokens: i32,
    /// The keys every prompt of the group may see: its longest `pos + tokens`.
    longest: i32,
    /// `[count * tokens]`: each padded row's row among the batched rows.
    pad: Array,
    /// `[count]`: each prompt's slot.
    slots: Array,
    /// `[count, 1, tokens, longest]`: 0 where a row sees a key, -inf elsewhere.
    mask: Array,
    /// The padded rows that are real tokens, in order.
    valid: Array,
}

/// The prompt rows of a step that are attended in groups.
pub(super) struct Batched {
    /// Every batched token, group by group, prompt by prompt, at its slot and position.
    rows: Rows,
    groups: Vec<Group>,
}

/// What [`plan`] makes of a step's prompts.
pub(super) struct Plan<'a> {
    /// The groups' attention, if any two prompts group.
    pub batched: Option<Batched>,
    /// The grouped prompts, in the order their outputs come.
    pub grouped: Vec<&'a Span>,
    /// The prompts attended one by one, in the step's order.
    pub separate: Vec<&'a Span>,
}

/// The most entries a group's mask (`count × tokens × keys`) may have: 4 Mi, 16 MiB of
/// f32 built on the host (and the scores the SDPA makes from it). Long prompts, or
/// chunks of prompts with a long cached prefix, attend alone with MLX's causal kernel,
/// which builds no mask.
const MASK_ENTRIES: usize = 1 << 22;

/// Which prompts are attended together, given each one's new `tokens` and the keys it
/// sees (`keys`: its position plus its tokens): groups of indices, taken longest first,
/// a group growing while `count × longest ≤ 2 × its tokens` and its mask stays within
/// [`MASK_ENTRIES`]. Groups of one are left out (such a prompt is attended alone).
fn groups(tokens: &[usize], keys: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tokens[i]));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let (mut sum, mut seen) = (0, 0);
    for i in order {
        let longest = current.first().map_or(tokens[i], |&f| tokens[f]);
        let count = current.len() + 1;
        let fits =
            count * longest <= 2 * (sum + tokens[i]) && count * longest * seen.max(keys[i]) <= MASK_ENTRIES;
        if !current.is_empty() && !fits {
            out.push(std::mem::take(&mut current));
            (sum, seen) = (0, 0);
        }
        current.push(i);
        sum += tokens[i];
        seen = seen.max(keys[i]);
    }
    out.push(current);
    out.retain(|g| g.len() > 1);
    out
}

/// How `prompts` (spans of more than one token) attend: the groups' batched attention
/// and the prompts left to attend one by one.
pub(super) fn plan<'a>(prompts: &[&'a Span], dtype: DType) -> Result<Plan<'a>> {
    let tokens: Vec<usize> = prompts.iter().map(|s| s.tokens).collect();
    let keys: Vec<usize> = prompts.iter().map(|s| s.pos + s.tokens).collect();
    let grouped = groups(&tokens, &keys);
    let mut in_group = vec![false; prompts.len()];
    grouped.iter().flatten().for_each(|&i| in_group[i] = true);
    let separate = prompts.iter().zip(&in_group).filter(|&(_, &g)| !g).map(|(s, _)| *s).collect();
    if grouped.is_empty() {
        return Ok(Plan { batched: None, grouped: Vec::new(), separate });
    }
    let (mut rows, mut slots, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    let mut order = Vec::new();
    let mut built = Vec::with_capacity(grouped.len());
    for members in grouped {
        let spans: Vec<&Span> = members.iter().map(|&i| prompts[i]).collect();
        let t = spans.iter().map(|s| s.tokens).max().unwrap_or(1);
        let longest = spans.iter().map(|s| s.pos + s.tokens).max().unwrap_or(1);
        let (mut pad, mut valid) = (Vec::with_capacity(spans.len() * t), Vec::new());
        let mut mask = Vec::with_capacity(spans.len() * t * longest);
        for (p, s) in spans.iter().enumerate() {
            let first = rows.len();
            for j in 0..t {
                // A padding row repeats the prompt's last row: same keys, same mask.
                let real = j.min(s.tokens - 1);
                pad.push((first + real) as i32);
                if j < s.tokens {
                    valid.push((p * t + j) as i32);
                }
                let sees = s.pos + real;
                mask.extend((0..longest).map(|k| if k <= sees { 0f32 } else { f32::NEG_INFINITY }));
            }
            for j in 0..s.tokens {
                rows.push((s.row + j) as i32);
                slots.push(s.slot as i32);
                positions.push((s.pos + j) as i32);
            }
            order.push(*s);
        }
        let count = spans.len();
        built.push(Group {
            count: count as i32,
            tokens: t as i32,
            longest: longest as i32,
            pad: Array::from_i32(&pad)?,
            slots: Array::from_i32(&spans.iter().map(|s| s.slot as i32).collect::<Vec<_>>())?,
            mask: Array::from_f32(&mask, &[count, 1, t, longest])?.astype(dtype)?,
            valid: Array::from_i32(&valid)?,
        });
    }
    let batched = Batched { rows: Rows::new(Some(&rows), &slots, &positions)?, groups: built };
    Ok(Plan { batched: Some(batched), grouped: order, separate })
}

impl Batched {
    /// One layer's attention of the batched prompts: their keys and values written into
    /// `kbuf` / `vbuf`, and one output piece a group (`[its tokens, heads × dim]`, in
    /// the order [`plan`] gave).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &self,
        (q, k, v): (&Array, &Array, &Array),
        (kbuf, vbuf): (&mut Array, &mut Array),
        heads: Heads,
        base: f32,
        scale: f32,
        pieces: &mut Vec<Array>,
    ) -> Result<()> {
        let Heads { q: nh, dim: hd, .. } = heads;
        let qs = self.rows.store((q, k, v), (&mut *kbuf, &mut *vbuf), heads, base)?;
        for g in &self.groups {
            let queries =
                qs.take(&g.pad, 0)?.reshape(&[g.count, g.tokens, nh, hd])?.transpose(&[0, 2, 1, 3])?;
            let (keys, values) = (gather(kbuf, &g.slots, g.longest)?, gather(vbuf, &g.slots, g.longest)?);
            let o = queries.attention(&keys, &values, scale, Some(&g.mask))?;
            let o = o.transpose(&[0, 2, 1, 3])?.reshape(&[g.count * g.tokens, nh * hd])?;
            pieces.push(o.take(&g.valid, 0)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn prompts_of_similar_lengths_group_and_a_long_one_stays_alone() {
        // Fresh prompts see as many keys as they have tokens.
        let fresh = |tokens: &[usize]| groups(tokens, tokens);
        // Similar lengths: one group, longest first.
        assert_eq!(fresh(&[30, 34, 31, 29]), vec![vec![1, 2, 0, 3]]);
        // One long prompt beside short ones: padding them all to 1900 rows would be
        // 64 × 1900; the padding alone would let the long one take one short one
        // (2 × 1900 ≤ 2 × 1912), but their mask (2 × 1900 × 1912) is past the bound:
        // it attends alone, the other 63 together.
        let mut tokens = vec![1900];
        tokens.extend([12; 63]);
        assert_eq!(fresh(&tokens), vec![(1..64).collect::<Vec<_>>()]);
        assert_eq!(fresh(&[300, 20, 20]), vec![vec![0, 1]], "2 × 300 ≤ 2 × 320, then 3 × 300 > 2 × 340");
        // A single prompt: nothing to batch.
        assert!(fresh(&[40]).is_empty());
        // Padded rows ≤ 2 × real ones in every group.
        let tokens = [50, 45, 30, 26, 24, 10, 9, 8, 3, 2];
        for g in fresh(&tokens) {
            let longest = g.iter().map(|&i| tokens[i]).max().unwrap();
            assert!(g.len() * longest <= 2 * g.iter().map(|&i| tokens[i]).sum::<usize>(), "{g:?}");
        }
        // Masks stay bounded: two prompts of 2048 tokens (2 × 2048 × 2048 entries), or
        // two 512-token chunks after a 4096-token prefix, attend alone; 64 of 40 group.
        assert!(fresh(&[2048, 2048]).is_empty());
        assert!(groups(&[512, 512], &[4608, 600]).is_empty());
        assert_eq!(groups(&[512, 512], &[600, 600]), vec![vec![0, 1]]);
        assert_eq!(fresh(&[40; 64]), vec![(0..64).collect::<Vec<_>>()]);
    }
}
