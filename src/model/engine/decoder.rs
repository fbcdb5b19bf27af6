//! The decoder session and how one pass is bound: an eager graph (cache grown by Concat, returned as new
//! `present.*` values) or a GroupQueryAttention graph (one buffer per layer and key/value, bound as both past and
//! present, written in place).

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, DynValue, Tensor};

use super::ort_util::{FloatKind, host_tensor_bytes, ort_err, read_floats};
use crate::model::ModelError;
use crate::model::manifest::{DecoderAttention, ModelManifest};
use crate::model::runtime::Device;

pub(super) struct Decoder {
    session: Session,
    pub attention: DecoderAttention,
    pub device: Device,
    embeds_float: FloatKind,
    /// Type of the KV cache (`past_key_values.*`), as the graph declares it.
    cache_float: FloatKind,
    /// Type of the logits output: fp32 in pixtract's exports; fp16 logits (other exporters) are widened on the host.
    pub logits_float: FloatKind,
    past_names: Vec<String>,
    present_names: Vec<String>,
    kv_memory: MemoryInfo<'static>,
    /// Where GroupQueryAttention cache buffers are allocated: host memory on the CPU, the session's device memory
    /// on CUDA (the cache then never crosses to the host; only logits do).
    cache_allocator: Allocator,
    hidden: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
}

/// One GroupQueryAttention pass's inputs besides the cache: `batch` rows, `positions.len() / batch` new tokens
/// each.
pub(super) struct GqaStep<'a> {
    pub embeds: &'a [f32],
    pub batch: usize,
    pub positions: &'a [i64],
    /// Per row: its length after this pass, minus one.
    pub seqlens_k: &'a [i32],
    /// The longest row's length after this pass.
    pub total: i32,
    /// Per row: which of its new positions gives the logits.
    pub logits_index: &'a [i64],
}

impl Decoder {
    /// Wraps an opened decoder session, checking it has the inputs of its manifest's attention.
    pub fn new(
        session: Session,
        manifest: &ModelManifest,
        device: Device,
    ) -> Result<Self, ModelError> {
        let attention = manifest.graphs.decoder.attention;
        let wanted = match attention {
            DecoderAttention::Eager => "attention_mask",
            DecoderAttention::Gqa => "seqlens_k",
        };
        if !session.inputs().iter().any(|i| i.name() == wanted) {
            return Err(ModelError::AttentionInputs {
                attention: attention.name(),
                wanted,
            });
        }
        let embeds_float = FloatKind::of(&session, "inputs_embeds")?;
        let cache_float = FloatKind::of(&session, "past_key_values.0.key")?;
        let logits_float = FloatKind::of_output(&session, "logits")?;
        let t = &manifest.text;
        let mut past_names = Vec::new();
        let mut present_names = Vec::new();
        for layer in 0..t.num_layers {
            for kind in ["key", "value"] {
                past_names.push(format!("past_key_values.{layer}.{kind}"));
                present_names.push(format!("present.{layer}.{kind}"));
            }
        }
        let kv_memory = match device {
            Device::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Arena,
                MemoryType::Default,
            ),
            Device::Cuda(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Arena,
                MemoryType::Default,
            ),
        }
        .map_err(ort_err("memory info"))?;
        let cache_allocator = match device {
            Device::Cpu => Allocator::default(),
            Device::Cuda(id) => Allocator::new(
                &session,
                MemoryInfo::new(
                    AllocationDevice::CUDA,
                    id,
                    AllocatorType::Device,
                    MemoryType::Default,
                )
                .map_err(ort_err("memory info"))?,
            )
            .map_err(ort_err("cache allocator"))?,
        };
        Ok(Decoder {
            session,
            cache_allocator,
            attention,
            device,
            embeds_float,
            cache_float,
            logits_float,
            past_names,
            present_names,
            kv_memory,
            hidden: t.hidden_size,
            kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            vocab: t.vocab_size,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// An empty cache (`[batch, kv_heads, 0, head_dim]` per layer and key/value) for an eager graph's first pass.
    pub fn empty_past(&self, batch: usize) -> Result<Vec<DynValue>, ModelError> {
        let shape = vec![batch as i64, self.kv_heads as i64, 0, self.head_dim as i64];
        (0..self.past_names.len())
            .map(|_| self.cache_float.tensor(shape.clone(), &[]))
            .collect()
    }

    /// A host buffer for `rows` last-position logits (`[rows, 1, vocab]`, the graph's logits type).
    pub fn logits_buffer(&self, rows: usize) -> Result<DynTensor, ModelError> {
        let ty = self.logits_float.element_type();
        DynTensor::new(
            &Allocator::default(),
            ty,
            vec![rows as i64, 1, self.vocab as i64],
        )
        .map_err(ort_err("logits buffer"))
    }

    /// Zeroed cache buffers `[rows, kv_heads, capacity, head_dim]`, one per layer and key/value, in the session's
    /// device memory (host memory on the CPU). Made with ONNX Runtime's allocator: only such tensors can be bound
    /// as outputs, which is what lets the decoder write into them in place. Zeroed although nothing past a row's
    /// length is read: a kernel that multiplies masked positions by zero would turn stale NaN bits into NaN.
    pub fn cache_buffers(
        &self,
        rows: usize,
        capacity: usize,
    ) -> Result<Vec<DynTensor>, ModelError> {
        let ty = self.cache_float.element_type();
        let shape = vec![
            rows as i64,
            self.kv_heads as i64,
            capacity as i64,
            self.head_dim as i64,
        ];
        let zeroed_host = || -> Result<DynTensor, ModelError> {
            let mut buffer = DynTensor::new(&Allocator::default(), ty, shape.clone())
                .map_err(ort_err("cache buffer"))?;
            let bytes = host_tensor_bytes(&buffer)?;
            // SAFETY: a host tensor just allocated for `bytes` bytes (shape x element size, checked host).
            unsafe { std::ptr::write_bytes(buffer.data_ptr_mut().cast::<u8>(), 0, bytes) };
            Ok(buffer)
        };
        if self.device == Device::Cpu {
            return (0..self.past_names.len()).map(|_| zeroed_host()).collect();
        }
        // Device memory cannot be written from here: one zeroed host buffer is copied into each.
        let zeros = zeroed_host()?;
        (0..self.past_names.len())
            .map(|_| {
                let mut buffer = DynTensor::new(&self.cache_allocator, ty, shape.clone())
                    .map_err(ort_err("device cache buffer"))?;
                zeros
                    .copy_into(&mut buffer)
                    .map_err(ort_err("zero device cache buffer"))?;
                Ok(buffer)
            })
            .collect()
    }

    /// A decoder binding holding what both decoder kinds take: `inputs_embeds` `[batch, seq, hidden]` (seq from
    /// `positions`), `position_ids` `[batch, seq]`, and the caller's `logits` buffer as the `logits` output.
    fn step_binding(
        &self,
        embeds: &[f32],
        batch: usize,
        positions: &[i64],
        logits: &mut DynTensor,
    ) -> Result<IoBinding, ModelError> {
        let seq = positions.len() / batch.max(1);
        let embeds = self
            .embeds_float
            .tensor(vec![batch as i64, seq as i64, self.hidden as i64], embeds)?;
        let positions = Tensor::from_array((vec![batch as i64, seq as i64], positions.to_vec()))
            .map_err(ort_err("position ids"))?;
        let bind = ort_err("decoder binding");
        let mut binding = self.session.create_binding().map_err(&bind)?;
        binding
            .bind_input("inputs_embeds", &embeds)
            .map_err(&bind)?;
        binding
            .bind_input("position_ids", &positions)
            .map_err(&bind)?;
        binding.bind_output("logits", &mut *logits).map_err(&bind)?;
        Ok(binding)
    }

    /// One pass of an eager decoder through IO binding: writes the last-position logits into `logits`
    /// (`[batch, 1, vocab]`, host) and returns the new cache.
    ///
    /// The logits buffer is the caller's and is reused step after step: a buffer ONNX Runtime allocates per run
    /// is fresh memory each time, written and read at page-fault speed instead of cache speed.
    pub fn eager_pass(
        &mut self,
        embeds: &[f32],
        batch: usize,
        mask: &[i64],
        positions: &[i64],
        past: &[DynValue],
        logits: &mut DynTensor,
    ) -> Result<Vec<DynValue>, ModelError> {
        let total = mask.len() / batch;
        let mask = Tensor::from_array((vec![batch as i64, total as i64], mask.to_vec()))
            .map_err(ort_err("attention mask"))?;
        let bind = ort_err("decoder binding");
        let mut binding = self.step_binding(embeds, batch, positions, logits)?;
        binding.bind_input("attention_mask", &mask).map_err(&bind)?;
        for (name, value) in self.past_names.iter().zip(past) {
            binding.bind_input(name, value).map_err(&bind)?;
        }
        // Re-bound every step: a buffer bound once would keep step 1's shape.
        for name in &self.present_names {
            binding
                .bind_output_to_device(name, &self.kv_memory)
                .map_err(&bind)?;
        }
        let mut outputs = self
            .session
            .run_binding(&binding)
            .map_err(ort_err("decoder"))?;
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| ModelError::Graph(format!("decoder returned no {name}")))?,
            );
        }
        Ok(present)
    }

    /// One pass of a GroupQueryAttention decoder with `buffers` bound as both `past_key_values.*` and `present.*`:
    /// ONNX Runtime writes the new keys/values at each row's position in place (no copy of the cache) and the
    /// logits of each row's `logits_index` into `logits`.
    pub fn gqa_pass(
        &mut self,
        step: GqaStep<'_>,
        buffers: &mut [DynTensor],
        logits: &mut DynTensor,
    ) -> Result<(), ModelError> {
        let batch = step.batch;
        let seqlens = Tensor::from_array((vec![batch as i64], step.seqlens_k.to_vec()))
            .map_err(ort_err("seqlens_k"))?;
        let total = Tensor::from_array((Vec::<i64>::new(), vec![step.total]))
            .map_err(ort_err("total sequence length"))?;
        let index = Tensor::from_array((vec![batch as i64], step.logits_index.to_vec()))
            .map_err(ort_err("logits index"))?;
        let bind = ort_err("decoder binding");
        let mut binding = self.step_binding(step.embeds, batch, step.positions, logits)?;
        binding.bind_input("seqlens_k", &seqlens).map_err(&bind)?;
        binding
            .bind_input("total_sequence_length", &total)
            .map_err(&bind)?;
        binding.bind_input("logits_index", &index).map_err(&bind)?;
        for ((past, present), buffer) in self
            .past_names
            .iter()
            .zip(&self.present_names)
            .zip(buffers.iter_mut())
        {
            binding.bind_input(past, &*buffer).map_err(&bind)?;
            binding.bind_output(present, &mut *buffer).map_err(&bind)?;
        }
        self.session
            .run_binding(&binding)
            .map_err(ort_err("decoder"))?;
        Ok(())
    }

    /// Rows `keep` of a `[batch, ...]` cache tensor (via the host: this runs once per finished sequence).
    pub fn gather_rows(&self, value: &DynValue, keep: &[usize]) -> Result<DynValue, ModelError> {
        let host;
        let value = if self.device == Device::Cpu {
            value
        } else {
            let tensor = value
                .view()
                .downcast::<ort::value::DynTensorValueType>()
                .map_err(ort_err("cache to host"))?;
            host = tensor
                .to(AllocationDevice::CPU, 0)
                .map_err(ort_err("cache to host"))?
                .into_dyn();
            &host
        };
        let (shape, data) = read_floats(value, "cache rows")?;
        let row = data.len() / (shape[0].max(1) as usize);
        let mut out = Vec::with_capacity(row * keep.len());
        for &k in keep {
            out.extend_from_slice(&data[k * row..(k + 1) * row]);
        }
        let mut new_shape = shape;
        new_shape[0] = keep.len() as i64;
        self.cache_float.tensor(new_shape, &out)
    }
}
