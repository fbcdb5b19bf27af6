//! Which prompts share a forward pass: longest first, as many as the batch size and the padded-token budget
//! allow, so rows of a batch have similar lengths and little padding.

use super::BatchPolicy;

/// Batches of prompt indices, longest prompts first, given each prompt's length in tokens.
pub fn plan_batches(lengths: &[usize], policy: BatchPolicy) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let longest = lengths[order[start]];
        let mut end = start + 1;
        while end < order.len()
            && end - start < policy.max_batch.max(1)
            && longest * (end - start + 1) <= policy.token_budget.max(longest)
        {
            end += 1;
        }
        batches.push(order[start..end].to_vec());
        start = end;
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_go_longest_first_within_size_and_budget() {
        let policy = BatchPolicy {
            max_batch: 2,
            token_budget: 100,
            batching: crate::model::Batching::Static,
            ..BatchPolicy::default()
        };
        // 60 with 50 would pad to 2 x 60 = 120 > 100: alone; 50 with 30 pads to exactly 100.
        assert_eq!(
            plan_batches(&[10, 60, 50, 20, 30], policy),
            vec![vec![1], vec![2, 4], vec![3, 0]]
        );
        // A prompt over the budget still runs, alone.
        assert_eq!(plan_batches(&[500], policy), vec![vec![0]]);
        assert!(plan_batches(&[], policy).is_empty());
    }
}
