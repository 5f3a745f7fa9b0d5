//! The input of one forward step: a flattened, unpadded batch of tokens from
//! many sequences, each prefilling a chunk or decoding one token.

use crate::kv_cache::BlockId;

/// One sequence's part of a [`ForwardBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Index of this sequence's first token in the flat batch.
    pub query_start: usize,
    /// Number of new tokens in this step (1 when decoding).
    pub query_len: usize,
    /// Tokens in the cache after this step: cached prefix + `query_len`.
    pub context_len: usize,
    pub block_table: Vec<BlockId>,
    /// An encoder-decoder model's encoder input: the first `encoder_len`
    /// cache positions hold the cross-attention keys and values computed from
    /// it, the decoder's own tokens follow (0 for every other model).
    pub encoder_len: usize,
}

impl SeqSlice {
    /// Tokens already in the cache before this step.
    pub fn num_cached(&self) -> usize {
        self.context_len - self.query_len
    }
}

/// Which positions of a sequence's chunk need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the last one).
    None,
    /// The last token only (sampling the next token).
    Last,
    /// Every token of the chunk (prompt logprobs).
    All,
}

/// Everything a model needs for one step, with no padding: token `i` of the
/// flat batch has id `token_ids[i]`, RoPE position `positions[i]` and is written
/// to KV slot `slot_mapping[i]`.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Flat token indices whose logits the step returns, in this order.
    pub logits_indices: Vec<u32>,
}

impl ForwardBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// Adds the `tokens` of one sequence that follow its `num_cached` cached
    /// tokens. `block_table` must already cover `num_cached + tokens.len()`.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        num_cached: usize,
        block_table: &[BlockId],
        block_size: usize,
        logits: Logits,
    ) {
        self.push_seq_after_encoder(tokens, num_cached, 0, block_table, block_size, logits)
    }

    /// [`ForwardBatch::push_seq`] for an encoder-decoder model's sequence
    /// whose first `encoder_len` tokens are its encoder input.
    pub fn push_seq_after_encoder(
        &mut self,
        tokens: &[u32],
        num_cached: usize,
        encoder_len: usize,
        block_table: &[BlockId],
        block_size: usize,
        logits: Logits,
    ) {
        assert!(
            !tokens.is_empty(),
            "a sequence in a batch needs at least one token"
        );
        let context_len = num_cached + tokens.len();
        assert!(
            block_table.len() * block_size >= context_len,
            "block table covers {} tokens, sequence needs {context_len}",
            block_table.len() * block_size
        );
        let query_start = self.token_ids.len();
        for (i, &tok) in tokens.iter().enumerate() {
            let pos = num_cached + i;
            self.token_ids.push(tok);
            self.positions.push(pos as u32);
            let slot = block_table[pos / block_size] as usize * block_size + pos % block_size;
            self.slot_mapping.push(slot as u32);
        }
        match logits {
            Logits::None => {}
            Logits::Last => self
                .logits_indices
                .push((query_start + tokens.len() - 1) as u32),
            Logits::All => self
                .logits_indices
                .extend((query_start..query_start + tokens.len()).map(|i| i as u32)),
        }
        self.seqs.push(SeqSlice {
            query_start,
            query_len: tokens.len(),
            context_len,
            block_table: block_table.to_vec(),
            encoder_len,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_chunks_and_decodes() {
        let mut b = ForwardBatch::new();
        // A decode at position 5 of a sequence in blocks [7, 3] (block size 4).
        b.push_seq(&[10], 5, &[7, 3], 4, Logits::Last);
        // A 3-token chunk after 2 cached tokens, blocks [1, 2].
        b.push_seq(&[20, 21, 22], 2, &[1, 2], 4, Logits::All);
        assert_eq!(b.token_ids, vec![10, 20, 21, 22]);
        assert_eq!(b.positions, vec![5, 2, 3, 4]);
        assert_eq!(b.slot_mapping, vec![3 * 4 + 1, 4 + 2, 4 + 3, 2 * 4]);
        assert_eq!(b.logits_indices, vec![0, 1, 2, 3]);
        assert_eq!(b.seqs[1].num_cached(), 2);
        assert_eq!(b.seqs[1].context_len, 5);
    }
}
