//! Which waiting prompt goes into the engine next, apart from the forward pass (as vLLM's scheduler is apart from
//! its model runner): prompts arrive one at a time while rows decode; the policy decides when and in which order
//! they start.
//!
//! - [`Batching::Continuous`](super::Batching::Continuous): the oldest waiting prompt is staged (prefilled into the staging row) as soon as the
//!   one before it has a slot; a finished row's slot takes it at the next step.
//! - [`Batching::Static`](super::Batching::Static): nothing starts while a batch runs; then up to `max_batch` waiting prompts, longest first
//!   within the padded-token budget ([`plan_batches`]' first batch), run together until their longest answer ends.
//!
//! Nothing here touches ONNX Runtime: the policy is unit-tested on lengths alone.

use std::collections::VecDeque;

use super::BatchPolicy;

/// Batches of prompt indices, longest prompts first, given each prompt's length in tokens.
pub fn plan_batches(lengths: &[usize], policy: BatchPolicy) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let end = start + first_batch_len(&order[start..], lengths, policy);
        batches.push(order[start..end].to_vec());
        start = end;
    }
    batches
}

/// How many of `order` (indices into `lengths`, longest first) share the first batch: as many as the batch size
/// and the budget of padded tokens (rows x longest) allow; a prompt over the budget runs alone.
fn first_batch_len(order: &[usize], lengths: &[usize], policy: BatchPolicy) -> usize {
    let Some(&first) = order.first() else {
        return 0;
    };
    let longest = lengths[first];
    let mut end = 1;
    while end < order.len()
        && end < policy.max_batch.max(1)
        && longest * (end + 1) <= policy.token_budget.max(longest)
    {
        end += 1;
    }
    end
}

/// A prompt waiting for the engine: the caller's id and its length in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    id: usize,
    len: usize,
}

/// The waiting prompts and the policy that starts them.
#[derive(Debug)]
pub(super) struct Scheduler {
    policy: BatchPolicy,
    /// In arrival order.
    waiting: VecDeque<Waiting>,
}

impl Scheduler {
    pub fn new(policy: BatchPolicy) -> Self {
        Scheduler {
            policy,
            waiting: VecDeque::new(),
        }
    }

    pub fn policy(&self) -> BatchPolicy {
        self.policy
    }

    /// A prompt of `len` tokens arrived.
    pub fn push(&mut self, id: usize, len: usize) {
        self.waiting.push_back(Waiting { id, len });
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Ids of the waiting prompts, in arrival order (the order continuous batching stages them).
    pub fn waiting_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.waiting.iter().map(|w| w.id)
    }

    /// Continuous: the prompt to stage next, the oldest waiting one (arrival order keeps a document's pages
    /// together and no prompt waits behind later ones).
    pub fn next_to_stage(&mut self) -> Option<usize> {
        self.waiting.pop_front().map(|w| w.id)
    }

    /// Static: the next batch to run to its end, from what is waiting now: longest first, within the batch size and
    /// the token budget. Empty when nothing waits.
    pub fn next_batch(&mut self) -> Vec<usize> {
        let lengths: Vec<usize> = self.waiting.iter().map(|w| w.len).collect();
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        // Stable: equal lengths keep arrival order.
        order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let n = first_batch_len(&order, &lengths, self.policy);
        let mut chosen: Vec<usize> = order[..n].to_vec();
        let ids: Vec<usize> = chosen.iter().map(|&i| self.waiting[i].id).collect();
        chosen.sort_unstable();
        for i in chosen.into_iter().rev() {
            self.waiting.remove(i);
        }
        ids
    }

    /// Continuous: prefill passes a staged prompt may run before the next decode step. While rows run, each pass
    /// stalls them, so at most `prefill_chunks_per_step` (0: the whole prompt); with none running, all of it.
    pub fn prefill_passes(&self, rows_running: bool) -> usize {
        match (rows_running, self.policy.prefill_chunks_per_step) {
            (false, _) | (true, 0) => usize::MAX,
            (true, n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Batching;

    fn policy(batching: Batching, max_batch: usize, token_budget: usize) -> BatchPolicy {
        BatchPolicy {
            max_batch,
            token_budget,
            batching,
            ..BatchPolicy::default()
        }
    }

    #[test]
    fn batches_go_longest_first_within_size_and_budget() {
        let policy = policy(Batching::Static, 2, 100);
        // 60 with 50 would pad to 2 x 60 = 120 > 100: alone; 50 with 30 pads to exactly 100.
        assert_eq!(
            plan_batches(&[10, 60, 50, 20, 30], policy),
            vec![vec![1], vec![2, 4], vec![3, 0]]
        );
        // A prompt over the budget still runs, alone.
        assert_eq!(plan_batches(&[500], policy), vec![vec![0]]);
        assert!(plan_batches(&[], policy).is_empty());
    }

    #[test]
    fn static_takes_the_plans_first_batch_from_what_waits_now() {
        let mut s = Scheduler::new(policy(Batching::Static, 2, 100));
        for (id, len) in [(7, 10), (8, 60), (9, 50), (10, 20), (11, 30)] {
            s.push(id, len);
        }
        // Same batches as planning the whole set at once (ids, not indices).
        assert_eq!(s.next_batch(), vec![8]);
        assert_eq!(s.next_batch(), vec![9, 11]);
        // A prompt arriving while the last batch is planned joins the planning.
        s.push(12, 25);
        assert_eq!(s.next_batch(), vec![12, 10]);
        assert_eq!(s.next_batch(), vec![7]);
        assert!(s.next_batch().is_empty());
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn static_batches_from_the_whole_set_equal_plan_batches() {
        let lengths = [33, 5, 70, 70, 12, 8, 90, 41, 41, 3];
        let p = policy(Batching::Static, 3, 150);
        let mut s = Scheduler::new(p);
        for (id, &len) in lengths.iter().enumerate() {
            s.push(id, len);
        }
        let mut from_scheduler = Vec::new();
        loop {
            let b = s.next_batch();
            if b.is_empty() {
                break;
            }
            from_scheduler.push(b);
        }
        assert_eq!(from_scheduler, plan_batches(&lengths, p));
    }

    #[test]
    fn continuous_stages_in_arrival_order() {
        let mut s = Scheduler::new(policy(Batching::Continuous, 2, 100));
        s.push(3, 90);
        s.push(1, 10);
        assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(s.next_to_stage(), Some(3));
        s.push(2, 500);
        assert_eq!(s.next_to_stage(), Some(1));
        assert_eq!(s.next_to_stage(), Some(2));
        assert_eq!(s.next_to_stage(), None);
    }

    #[test]
    fn prefill_stalls_running_rows_for_at_most_the_configured_chunks() {
        let mut p = policy(Batching::Continuous, 4, 100);
        p.prefill_chunks_per_step = 2;
        let s = Scheduler::new(p);
        assert_eq!(s.prefill_passes(true), 2);
        assert_eq!(s.prefill_passes(false), usize::MAX);
        p.prefill_chunks_per_step = 0;
        assert_eq!(Scheduler::new(p).prefill_passes(true), usize::MAX);
    }
}
