//! Scoring a prepared batch under candidate prompts. Prefix placement runs every prompt over
//! length-bucketed chunks of whole sequences; suffix placement runs only the placeholders and
//! the template's tail over each chunk's cached text, the candidates (and the jobs) of a
//! population grouped into decoder passes of about `suffix_pass_rows` rows.

use candle_core::{IndexOp, Tensor};

use super::batch::CausalBatch;
use super::decoder::{Attend, KvCache, Segment};
use super::masks::causal_mask;
use super::CausalLm;
use crate::models::{Placement, ScoreJob};
use crate::{Error, Result};

impl CausalLm {
    /// Scores every example under each prompt; `with_placeholders = false` (and no prompts) is
    /// the manual prompt. Returns `[prompt][example][class]`.
    pub(super) fn score_candidates(
        &self,
        b: &CausalBatch,
        prompts: &[Tensor],
        with_placeholders: bool,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let n_cand = prompts.len().max(1);
        let mut out = vec![vec![Vec::new(); b.examples.len()]; n_cand];
        match b.placement {
            Placement::Suffix => {
                let mut items = self.suffix_passes(&[(b, prompts, with_placeholders)])?;
                out = items.pop().ok_or_else(|| Error::Model("no suffix scores".into()))?;
            }
            Placement::Prefix => {
                let len = |i: usize| b.examples[i].head.len() + b.examples[i].tail.len();
                for chunk in length_chunks(&b.order, len, self.chunk_examples) {
                    for p in 0..n_cand {
                        let seqs: Vec<Vec<u32>> = chunk
                            .iter()
                            .map(|&i| {
                                let e = &b.examples[i];
                                let mut s = if with_placeholders {
                                    b.placeholders.clone()
                                } else {
                                    Vec::new()
                                };
                                s.extend_from_slice(&e.head);
                                s.extend_from_slice(&e.tail);
                                s
                            })
                            .collect();
                        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
                        let (mut x, attended) = self.embed_padded(&refs)?;
                        let t = attended[0].len();
                        if with_placeholders {
                            // Placeholders lead each sequence, right after its left padding;
                            // inject per row at its own offset.
                            let mut rows = Vec::with_capacity(chunk.len());
                            for (r, seq) in refs.iter().enumerate() {
                                let row = x.narrow(0, r, 1)?;
                                rows.push(self.inject(&row, &prompts[p], t - seq.len())?);
                            }
                            x = Tensor::cat(&rows, 0)?;
                        }
                        let mask = causal_mask(&attended, &self.device)?;
                        let positions: Vec<u32> = (0..t as u32).collect();
                        let (h, _) = self.forward_embeds(&x, &positions, &mask, None, false)?;
                        let last = h.i((.., t - 1))?.contiguous()?;
                        let logits = self.label_logits(&last, &b.label_ids)?;
                        for (&i, row) in chunk.iter().zip(logits.to_vec2::<f32>()?) {
                            out[p][i] = row;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The decoder input of one chunk's candidate blocks, and the block length `S`.
    fn suffix_segment<'a>(
        &self,
        cache: &'a KvCache,
        tail: &[u32],
        placeholders: &[u32],
        prompts: &[Tensor],
        with_placeholders: bool,
    ) -> Result<(Segment<'a>, usize)> {
        let n_cand = prompts.len().max(1);
        let b = cache.attended.len();
        let t_past = cache.attended[0].len();
        let mut block: Vec<u32> =
            if with_placeholders { placeholders.to_vec() } else { Vec::new() };
        block.extend_from_slice(tail);
        let s = block.len();
        let base = self
            .embed
            .index_select(&Tensor::new(block.as_slice(), &self.device)?, 0)?
            .unsqueeze(0)?;
        let blocks = if with_placeholders {
            prompts.iter().map(|p| self.inject(&base, p, 0)).collect::<Result<Vec<_>>>()?
        } else {
            vec![base]
        };
        let x = Tensor::cat(&blocks, 1)?; // [1, P*S, H]
        let x = x.broadcast_as((b, n_cand * s, self.cfg.hidden_size))?.contiguous()?;
        let positions: Vec<u32> =
            (0..n_cand).flat_map(|_| (0..s as u32).map(|j| t_past as u32 + j)).collect();
        // Only the last token of each block is scored.
        let outputs = Some((0..n_cand).map(|p| p * s + s - 1).collect());
        Ok((Segment { x, positions, attend: Attend::Blocks(s), past: Some(cache), outputs }, s))
    }

    /// Label logits `[prompt][example][class]` from the hidden states `[B, P, H]` of the last
    /// token of a chunk's candidate blocks (the segment's `outputs`).
    fn suffix_logits(
        &self,
        h: &Tensor,
        n_cand: usize,
        label_ids: &[u32],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let (b, cols, _) = h.dims3()?;
        if cols != n_cand {
            return Err(Error::Model(format!("{cols} hidden states per row for {n_cand} blocks")));
        }
        let last = h.reshape((b * n_cand, self.cfg.hidden_size))?;
        let logits = self.label_logits(&last, label_ids)?.reshape((b, n_cand, label_ids.len()))?;
        Ok(logits.transpose(0, 1)?.contiguous()?.to_vec3::<f32>()?)
    }

    /// Several jobs' suffix chunks through shared decoder passes.
    pub(super) fn suffix_jobs(
        &self,
        jobs: &[ScoreJob<'_>],
        batches: &[&CausalBatch],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        let prompts = jobs
            .iter()
            .map(|j| j.prompts.iter().map(|p| self.prompt_tensor(p)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let work: Vec<_> =
            batches.iter().zip(&prompts).map(|(b, p)| (*b, p.as_slice(), true)).collect();
        self.suffix_passes(&work)
    }

    /// Scores of suffix work items `(batch, prompts, with placeholders)`, each as
    /// `[prompt][example][class]` (one "prompt" when there are none: the manual prompt). Every
    /// (chunk, group of candidates) is a segment of about `suffix_pass_rows` rows or fewer, and
    /// consecutive segments share a decoder pass up to that many rows: the activations of a pass
    /// this size stay in cache, where one pass over all 20 candidates of a 64-example chunk
    /// (10,240 rows) would not.
    fn suffix_passes(
        &self,
        work: &[(&CausalBatch, &[Tensor], bool)],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        /// Where a segment's scores go: work item, the chunk's examples, first prompt, prompts.
        type Origin<'c> = (usize, &'c [usize], usize, usize);
        let mut out: Vec<Vec<Vec<Vec<f32>>>> = work
            .iter()
            .map(|(b, p, _)| vec![vec![Vec::new(); b.examples.len()]; p.len().max(1)])
            .collect();
        let flush = |pending: &mut Vec<(Segment<'_>, Origin<'_>)>,
                     out: &mut Vec<Vec<Vec<Vec<f32>>>>|
         -> Result<()> {
            let (segs, origins): (Vec<_>, Vec<_>) = pending.drain(..).unzip();
            let (hidden, _) = self.decode(&segs, false)?;
            for (h, (wi, chunk, first, n)) in hidden.iter().zip(origins) {
                let logits = self.suffix_logits(h, n.max(1), &work[wi].0.label_ids)?;
                scatter(&mut out[wi][first..], chunk, logits);
            }
            Ok(())
        };
        let mut pending = Vec::new();
        let mut pending_rows = 0;
        for (wi, &(b, prompts, with_placeholders)) in work.iter().enumerate() {
            let s = b.tail.len() + if with_placeholders { b.placeholders.len() } else { 0 };
            for (cache, chunk) in b.caches.iter().zip(b.order.chunks(self.chunk_examples)) {
                let per_pass = (self.suffix_pass_rows / (chunk.len() * s).max(1)).max(1);
                let groups: Vec<&[Tensor]> = if prompts.is_empty() {
                    vec![prompts]
                } else {
                    prompts.chunks(per_pass).collect()
                };
                for (gi, group) in groups.into_iter().enumerate() {
                    let (seg, s) = self.suffix_segment(
                        cache,
                        &b.tail,
                        &b.placeholders,
                        group,
                        with_placeholders,
                    )?;
                    let rows = chunk.len() * group.len().max(1) * s;
                    if !pending.is_empty() && pending_rows + rows > self.suffix_pass_rows {
                        flush(&mut pending, &mut out)?;
                        pending_rows = 0;
                    }
                    pending.push((seg, (wi, chunk, gi * per_pass, group.len())));
                    pending_rows += rows;
                }
            }
        }
        if !pending.is_empty() {
            flush(&mut pending, &mut out)?;
        }
        Ok(out)
    }

    /// Logits of `label_ids` from final hidden states `[N, H]`.
    fn label_logits(&self, hidden: &Tensor, label_ids: &[u32]) -> Result<Tensor> {
        let hn = candle_nn::ops::rms_norm(hidden, &self.final_norm, self.cfg.rms_norm_eps as f32)?;
        let rows = self.lm_head.index_select(&Tensor::new(label_ids, &self.device)?, 0)?;
        Ok(hn.matmul(&rows.t()?)?)
    }
}

/// Writes a chunk's `[prompt][row][class]` scores to the rows' example indices.
fn scatter(out: &mut [Vec<Vec<f32>>], chunk: &[usize], scores: Vec<Vec<Vec<f32>>>) {
    for (p, rows) in scores.into_iter().enumerate() {
        for (&i, row) in chunk.iter().zip(rows) {
            out[p][i] = row;
        }
    }
}

/// Splits `order` (sorted by length) into runs of at most `max_rows` whose longest member is at
/// most 1/8 (plus 2 tokens) longer than the shortest, so that a left-padded pass computes few
/// padding rows. On MR's mixed lengths one 64-row chunk padded to its longest sentence computed
/// almost twice the real tokens.
fn length_chunks(order: &[usize], len: impl Fn(usize) -> usize, max_rows: usize) -> Vec<&[usize]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let shortest = len(order[start]);
        let limit = shortest + shortest / 8 + 2;
        let mut end = start + 1;
        while end < order.len() && end - start < max_rows.max(1) && len(order[end]) <= limit {
            end += 1;
        }
        chunks.push(&order[start..end]);
        start = end;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_chunks_bound_padding_and_rows_and_cover_everything() {
        let lengths = [3usize, 3, 4, 5, 9, 9, 10, 30, 31, 31, 31];
        let order: Vec<usize> = (0..lengths.len()).collect();
        let chunks = length_chunks(&order, |i| lengths[i], 2);
        let flat: Vec<usize> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(flat, order);
        for c in &chunks {
            assert!(!c.is_empty() && c.len() <= 2);
            let (lo, hi) = (lengths[c[0]], lengths[*c.last().unwrap()]);
            assert!(hi <= lo + lo / 8 + 2, "{c:?}");
        }
        assert_eq!(length_chunks(&order, |i| lengths[i], 64).len(), 3);
    }
}
