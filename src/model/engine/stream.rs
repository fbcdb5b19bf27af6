//! The step-wise engine, in the manner of vLLM's engine core and mistral.rs: prompts are [`added`] as they arrive,
//! each [`step`] advances the running rows by one token (after admitting waiting prompts the policy lets in) and
//! returns the sequences that finished, and [`has_capacity`] tells the feeder when to hand over more. The
//! [`Scheduler`] decides which waiting prompt starts when; the KV cache decides how a pass is bound:
//!
//! - continuous batching on a GroupQueryAttention decoder: [`SlotState`], slots refilled as rows finish, the next
//!   prompt prefilled a chunk at a time between decode steps, its pages encoded ahead on the vision thread;
//! - static batching (and any eager decoder): a step takes the scheduler's next batch and runs it to its end
//!   through [`PixtralEngine::run_batch`] (the batch's cache compacted as rows finish).
//!
//! [`added`]: StreamEngine::add
//! [`step`]: StreamEngine::step
//! [`has_capacity`]: StreamEngine::has_capacity

use crate::error::Retryable;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::scheduler::Scheduler;
use super::slots::{Phase, SlotParts, SlotState};
use super::vision::{PromptFeatures, VisionEncoder};
use super::{
    BatchPolicy, Batching, Generation, GenerationConfig, GenerationStats, PixtralEngine, StepHook,
    default_prefill_chunk,
};
use crate::model::ModelError;
use crate::model::manifest::DecoderAttention;
use crate::model::prompt::EncodedPrompt;

/// Where one sequence's time went. `vision` and `prefill` are its own; `decode` is its share of the decode steps
/// it was in (each step's time over the rows working in it; a static batch's decode over its tokens).
#[derive(Debug, Clone, Copy, Default)]
pub struct RowTiming {
    pub vision: Duration,
    pub prefill: Duration,
    pub decode: Duration,
}

/// A sequence the engine is done with.
#[derive(Debug)]
pub struct Finished {
    /// The id it was added with.
    pub id: usize,
    pub generation: Generation,
    pub timing: RowTiming,
}

pub struct StreamEngine {
    config: GenerationConfig,
    scheduler: Scheduler,
    /// Prompt and answer tokens one slot holds.
    capacity: usize,
    /// Prompt tokens per prefill pass.
    chunk: usize,
    /// Continuous batching through KV-cache slots (else static batches).
    slotted: bool,
    /// Prompts not yet staged or batched.
    prompts: HashMap<usize, Arc<EncodedPrompt>>,
    /// Every sequence added and not finished, with its time so far.
    timing: HashMap<usize, RowTiming>,
    /// Allocated at the first step that needs it, dropped after a failed pass.
    slots: Option<SlotState>,
    vision: Arc<Mutex<VisionEncoder>>,
    ahead: Option<VisionAhead>,
    /// Sequences that finished in a step that then failed: handed out by the next step, never lost.
    carry: Vec<Finished>,
    pub stats: GenerationStats,
}

impl PixtralEngine {
    /// A step-wise engine over this engine's sessions for prompts of up to `max_prompt_tokens` (the slots are sized
    /// for them plus `config.max_new_tokens`, within the model's context). Step it with this same engine.
    pub fn stream(
        &self,
        config: GenerationConfig,
        policy: BatchPolicy,
        max_prompt_tokens: usize,
    ) -> StreamEngine {
        let capacity = (max_prompt_tokens + config.max_new_tokens).min(self.context_limit());
        let chunk = match config
            .prefill_chunk
            .unwrap_or_else(|| default_prefill_chunk(self.device))
        {
            0 => capacity.max(1),
            c => c,
        };
        let slotted = policy.batching == Batching::Continuous
            && self.decoder.attention == DecoderAttention::Gqa;
        StreamEngine {
            config,
            scheduler: Scheduler::new(policy),
            capacity,
            chunk,
            slotted,
            prompts: HashMap::new(),
            timing: HashMap::new(),
            slots: None,
            vision: self.vision.clone(),
            ahead: None,
            carry: Vec::new(),
            stats: GenerationStats::default(),
        }
    }
}

impl StreamEngine {
    /// Prompt and answer tokens a sequence may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues prompt `id` (the caller's name for it, unique among those in flight; the step hook sees it as the
    /// row). Refused when it is empty or it and its answer do not fit a slot.
    pub fn add(&mut self, id: usize, prompt: EncodedPrompt) -> Result<(), ModelError> {
        let len = prompt.ids.len();
        if len == 0 {
            return Err(ModelError::EmptyPrompt { row: id });
        }
        if len + self.config.max_new_tokens > self.capacity {
            return Err(ModelError::ContextTooLong {
                prompt: len,
                new_tokens: self.config.max_new_tokens,
                limit: self.capacity,
            });
        }
        if self.timing.contains_key(&id) {
            return Err(ModelError::Graph(format!(
                "sequence {id} added while in flight"
            )));
        }
        self.scheduler.push(id, len);
        self.prompts.insert(id, Arc::new(prompt));
        self.timing.insert(id, RowTiming::default());
        if let Some(ahead) = self.ahead.as_mut() {
            ahead.unsent.push_back(id);
            ahead.top_up(&self.prompts);
        }
        Ok(())
    }

    /// Whether the feeder should add more now: fewer prompts wait than one batch holds, so a freed slot (or the
    /// next static batch) always finds a prompt, while the queue (and the memory its pages hold) stays bounded.
    pub fn has_capacity(&self) -> bool {
        self.scheduler.waiting() < self.scheduler.policy().max_batch.max(1)
    }

    /// Nothing waits, is staged or runs.
    pub fn is_idle(&self) -> bool {
        self.timing.is_empty() && self.carry.is_empty()
    }

    /// Sequences added and not finished.
    pub fn in_flight(&self) -> usize {
        self.timing.len()
    }

    /// One step: admit what the policy lets in, decode one token for every running row (static: run the next
    /// batch to its end). Returns the sequences that finished. An error is the pass's (ONNX Runtime, the device):
    /// the sequences in flight are then the caller's to [`abandon`](Self::abandon).
    pub fn step(
        &mut self,
        engine: &mut PixtralEngine,
        hook: &mut dyn StepHook,
    ) -> Result<Vec<Finished>, ModelError> {
        let mut finished = std::mem::take(&mut self.carry);
        let stepped = if self.slotted {
            self.step_slots(engine, hook, &mut finished)
        } else {
            self.step_batch(engine, hook, &mut finished)
        };
        match stepped {
            Ok(()) => Ok(finished),
            Err(e) => {
                // What finished before the failure is still finished: the next step hands it out.
                self.carry = finished;
                Err(e)
            }
        }
    }

    /// After a failed step: the sequences the step had started (staged, running, in the failed batch) leave
    /// without a result, by id; prompts still waiting stay for the next step. The cache is not trusted after a
    /// failed pass (the next step allocates it again) and the vision thread starts afresh.
    pub fn abandon(&mut self) -> Vec<usize> {
        let waiting: std::collections::HashSet<usize> = self.scheduler.waiting_ids().collect();
        let mut ids: Vec<usize> = self
            .timing
            .keys()
            .copied()
            .filter(|id| !waiting.contains(id))
            .collect();
        ids.sort_unstable();
        for id in &ids {
            self.timing.remove(id);
            self.prompts.remove(id);
        }
        self.slots = None;
        self.ahead = None;
        ids
    }

    /// The stats of every step so far (the vision thread, if any, ends here).
    pub fn finish(mut self) -> GenerationStats {
        self.ahead = None;
        std::mem::take(&mut self.stats)
    }

    fn done(&mut self, id: usize, generation: Generation) -> Finished {
        let timing = self.timing.remove(&id).unwrap_or_default();
        Finished {
            id,
            generation,
            timing,
        }
    }

    fn charge(&mut self, id: usize, phase: Phase, took: Duration) {
        if let Some(t) = self.timing.get_mut(&id) {
            match phase {
                Phase::Prefill => t.prefill += took,
                Phase::Decode => t.decode += took,
            }
        }
    }

    /// Static batching: the scheduler's next batch, run to its end.
    fn step_batch(
        &mut self,
        engine: &mut PixtralEngine,
        hook: &mut dyn StepHook,
        finished: &mut Vec<Finished>,
    ) -> Result<(), ModelError> {
        let ids = self.scheduler.next_batch();
        if ids.is_empty() {
            return self.nothing_to_do(finished);
        }
        let prompts = ids
            .iter()
            .map(|id| {
                self.prompts.remove(id).ok_or_else(|| {
                    ModelError::Graph(format!("sequence {id} was scheduled without its prompt"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&EncodedPrompt> = prompts.iter().map(|p| &**p).collect();
        let (generations, stats) = engine.run_batch(&refs, &ids, &self.config, hook)?;
        self.stats.add(&stats);
        // Each row's share of its batch: vision by images, prefill by prompt tokens, decode by tokens.
        let total = |f: &dyn Fn(usize) -> usize| (0..refs.len()).map(f).sum::<usize>().max(1);
        let images = total(&|j| refs[j].images.len());
        let prompt_tokens = total(&|j| refs[j].ids.len());
        let generated = total(&|j| generations[j].tokens.len());
        let share = |d: Duration, part: usize, all: usize| d.mul_f64(part as f64 / all as f64);
        for (j, (id, generation)) in ids.into_iter().zip(generations).enumerate() {
            let timing = RowTiming {
                vision: share(stats.vision, refs[j].images.len(), images),
                prefill: share(stats.prefill, refs[j].ids.len(), prompt_tokens),
                decode: share(stats.decode, generation.tokens.len(), generated),
            };
            self.timing.insert(id, timing);
            finished.push(self.done(id, generation));
        }
        Ok(())
    }

    /// Continuous batching: fill free slots, then one decode step over all of them.
    fn step_slots(
        &mut self,
        engine: &mut PixtralEngine,
        hook: &mut dyn StepHook,
        finished: &mut Vec<Finished>,
    ) -> Result<(), ModelError> {
        let policy = self.scheduler.policy();
        let PixtralEngine {
            model,
            embed,
            decoder,
            ..
        } = engine;
        if self.slots.is_none() {
            let slots = SlotState::new(decoder, policy.max_batch.max(1), self.capacity)?;
            self.stats.kv_cache_memory = slots.memory();
            self.stats.batches += 1;
            self.slots = Some(slots);
        }
        if policy.vision_ahead > 0 && self.ahead.is_none() {
            let mut ahead = VisionAhead::start(self.vision.clone(), policy.vision_ahead)?;
            ahead.unsent = self.scheduler.waiting_ids().collect();
            ahead.top_up(&self.prompts);
            self.ahead = Some(ahead);
        }
        // A copy: `parts` lives through calls that borrow all of `self`.
        let config = self.config.clone();
        let mut parts = SlotParts {
            manifest: &model.manifest,
            embed,
            decoder,
            config: &config,
            chunk: self.chunk,
        };
        let before = finished.len();
        self.fill_slots(&mut parts, hook, finished)?;
        let Some(slots) = self.slots.as_mut() else {
            return Ok(());
        };
        let busy = slots.busy();
        if busy == 0 {
            if finished.len() == before && slots.staged().is_none() && self.scheduler.waiting() == 0
            {
                return self.nothing_to_do(finished);
            }
            return Ok(());
        }
        let t = Instant::now();
        let width = policy.max_batch.max(1);
        let (done, charges) = slots.decode_step(
            &mut parts,
            hook,
            &mut self.stats.forward,
            policy.overlap_masks,
        )?;
        self.stats.decode += t.elapsed();
        self.stats.decode_tokens += busy;
        self.stats.decode_row_capacity += width;
        self.stats.steps += 1;
        for (id, phase, took) in charges {
            self.charge(id, phase, took);
        }
        for (id, generation) in done {
            finished.push(self.done(id, generation));
        }
        Ok(())
    }

    /// Between two decode steps: stage the next prompt, prefill it within the scheduler's chunks (all of it while
    /// no row runs) and admit complete ones into free slots.
    fn fill_slots(
        &mut self,
        parts: &mut SlotParts<'_>,
        hook: &mut dyn StepHook,
        finished: &mut Vec<Finished>,
    ) -> Result<(), ModelError> {
        let gap = Instant::now();
        let stalled = self.slots.as_ref().is_some_and(|s| s.busy() > 0);
        let mut chunks_left = self.scheduler.prefill_passes(true);
        let mut gap_tokens = 0;
        loop {
            let staged = self.slots.as_ref().and_then(SlotState::staged);
            if staged.is_none() && !self.stage_next(parts, finished)? {
                break;
            }
            let Some(slots) = self.slots.as_mut() else {
                break;
            };
            let Some(id) = slots.staged() else { break };
            let busy = slots.busy() > 0;
            let passes = if busy { chunks_left } else { usize::MAX };
            let t = Instant::now();
            let (tokens, ran, complete) = slots.prefill(parts, passes, &mut self.stats)?;
            if busy {
                chunks_left = chunks_left.saturating_sub(ran);
                gap_tokens += tokens;
            }
            let t_admit = Instant::now();
            let admitted = if complete {
                slots.admit(parts, hook)?
            } else {
                None
            };
            self.stats.prefill += t_admit - t;
            self.charge(id, Phase::Prefill, t_admit - t);
            let Some((id, ended)) = admitted else { break };
            let took = t_admit.elapsed();
            self.stats.admissions += 1;
            self.stats.decode_tokens += 1;
            self.stats.decode_row_capacity += 1;
            self.stats.decode += took;
            self.charge(id, Phase::Decode, took);
            if let Some(generation) = ended {
                finished.push(self.done(id, generation));
            }
        }
        if stalled {
            self.stats.max_stall_tokens = self.stats.max_stall_tokens.max(gap_tokens);
            self.stats.max_stall = self.stats.max_stall.max(gap.elapsed());
        }
        Ok(())
    }

    /// Encodes the next waiting prompt's pages (or takes them from the vision thread) and embeds it into the
    /// staging row. A prompt whose pages the vision encoder refuses finishes at once, failed, and the next one is
    /// tried. False when nothing waits.
    fn stage_next(
        &mut self,
        parts: &mut SlotParts<'_>,
        finished: &mut Vec<Finished>,
    ) -> Result<bool, ModelError> {
        loop {
            let Some(id) = self.scheduler.next_to_stage() else {
                return Ok(false);
            };
            let prompt = self.prompts.get(&id).cloned().ok_or_else(|| {
                ModelError::Graph(format!("sequence {id} was staged without its prompt"))
            })?;
            let encoded = match self.ahead.as_mut() {
                Some(ahead) => ahead.take(id, &self.prompts, &mut self.stats)?,
                None => encode(&self.vision, &prompt),
            };
            self.prompts.remove(&id);
            let features = match encoded {
                Ok(f) => f,
                // A run that failed (the device) may pass next time: the step fails, and the prompt is the
                // caller's to retry, rather than a permanent failure of its document.
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    let generation = Generation::failed(prompt.ids.len(), &e);
                    finished.push(self.done(id, generation));
                    continue;
                }
            };
            self.stats.vision += features.took;
            self.stats.images += features.images;
            if let Some(t) = self.timing.get_mut(&id) {
                t.vision += features.took;
            }
            let t = Instant::now();
            let Some(slots) = self.slots.as_mut() else {
                return Ok(false);
            };
            slots.stage(parts, id, &prompt, features.features)?;
            self.stats.prefill += t.elapsed();
            self.charge(id, Phase::Prefill, t.elapsed());
            return Ok(true);
        }
    }

    /// A step that found nothing to do: fine when idle; otherwise sequences were lost track of (a bug), which is
    /// an error rather than a caller stepping forever.
    fn nothing_to_do(&self, finished: &[Finished]) -> Result<(), ModelError> {
        if self.timing.is_empty() || !finished.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Graph(format!(
                "{} sequence(s) in flight, none waiting, staged or running",
                self.timing.len()
            )))
        }
    }
}

/// The vision encoder on the calling thread.
fn encode(
    vision: &Mutex<VisionEncoder>,
    prompt: &EncodedPrompt,
) -> Result<PromptFeatures, ModelError> {
    vision
        .lock()
        .map_err(|_| ModelError::Graph("the vision encoder's lock is poisoned".into()))?
        .prompt_features(prompt)
}

/// The vision encoder on a thread of its own, `ahead` prompts ahead of staging, in arrival order (the order
/// continuous batching stages them), while the decoder steps.
struct VisionAhead {
    ahead: usize,
    to_encode: Option<mpsc::Sender<Arc<EncodedPrompt>>>,
    encoded: mpsc::Receiver<Result<PromptFeatures, ModelError>>,
    /// Waiting prompts not yet sent, in arrival order.
    unsent: VecDeque<usize>,
    /// Sent and not yet taken, in the order their features will come back.
    outstanding: VecDeque<usize>,
    thread: Option<JoinHandle<()>>,
}

impl VisionAhead {
    fn start(vision: Arc<Mutex<VisionEncoder>>, ahead: usize) -> Result<Self, ModelError> {
        let (to_encode, requests) = mpsc::channel::<Arc<EncodedPrompt>>();
        let (results, encoded) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pixtract-vision".into())
            .spawn(move || {
                // Ends when the engine drops its sender, or stops listening.
                while let Ok(prompt) = requests.recv() {
                    if results.send(encode(&vision, &prompt)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| ModelError::Graph(format!("cannot start the vision thread: {e}")))?;
        Ok(VisionAhead {
            ahead,
            to_encode: Some(to_encode),
            encoded,
            unsent: VecDeque::new(),
            outstanding: VecDeque::new(),
            thread: Some(thread),
        })
    }

    /// Sends waiting prompts until `ahead` are with the thread.
    fn top_up(&mut self, prompts: &HashMap<usize, Arc<EncodedPrompt>>) {
        while self.outstanding.len() < self.ahead {
            let Some(id) = self.unsent.pop_front() else {
                break;
            };
            let Some(prompt) = prompts.get(&id) else {
                continue;
            };
            // A send to a thread that ended fails; `take` then reports the thread gone.
            if let Some(tx) = &self.to_encode {
                let _ = tx.send(prompt.clone());
            }
            self.outstanding.push_back(id);
        }
    }

    /// The features of `id`, the prompt being staged (the oldest waiting, so the first the thread encodes; it is
    /// still in `prompts`, so topping up sends it when nothing is outstanding).
    fn take(
        &mut self,
        id: usize,
        prompts: &HashMap<usize, Arc<EncodedPrompt>>,
        stats: &mut GenerationStats,
    ) -> Result<Result<PromptFeatures, ModelError>, ModelError> {
        self.top_up(prompts);
        if self.outstanding.front() != Some(&id) {
            return Err(ModelError::Graph(format!(
                "the vision thread encodes {:?} next, the engine stages {id}",
                self.outstanding.front()
            )));
        }
        let waited = Instant::now();
        let encoded = self
            .encoded
            .recv()
            .map_err(|_| ModelError::Graph("the vision encoder's thread ended early".into()))?;
        stats.vision_wait += waited.elapsed();
        self.outstanding.pop_front();
        self.top_up(prompts);
        Ok(encoded)
    }
}

impl Drop for VisionAhead {
    fn drop(&mut self) {
        // Closing both channels ends the thread after the prompt it is encoding (with the results' receiver alive it
        // would first encode everything still queued).
        self.to_encode = None;
        self.encoded = mpsc::channel().1;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
