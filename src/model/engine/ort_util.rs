//! Small helpers over ort's values: float types as the graphs declare them, host copies, raw row copies
//! between host tensors, and where a tensor's memory is.

use half::f16;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{
    DynTensor, DynValue, PrimitiveTensorElementType, Shape, Tensor, TensorElementType,
    TensorRefMut, ValueType,
};

use crate::model::ModelError;

/// Float type a graph takes (from its declared input types, so fp32 and fp16 exports run the same code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FloatKind {
    F32,
    F16,
}

impl FloatKind {
    pub fn of(session: &Session, input: &str) -> Result<FloatKind, ModelError> {
        let outlet = session
            .inputs()
            .iter()
            .find(|o| o.name() == input)
            .ok_or_else(|| ModelError::Graph(format!("graph has no input {input}")))?;
        Self::of_type(outlet.dtype(), input)
    }

    pub fn of_output(session: &Session, output: &str) -> Result<FloatKind, ModelError> {
        let outlet = session
            .outputs()
            .iter()
            .find(|o| o.name() == output)
            .ok_or_else(|| ModelError::Graph(format!("graph has no output {output}")))?;
        Self::of_type(outlet.dtype(), output)
    }

    fn of_type(dtype: &ValueType, input: &str) -> Result<FloatKind, ModelError> {
        match dtype {
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                ..
            } => Ok(FloatKind::F32),
            ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => Ok(FloatKind::F16),
            other => Err(ModelError::Graph(format!(
                "{input} has type {other:?}; expected float32 or float16"
            ))),
        }
    }

    pub fn element_type(self) -> TensorElementType {
        match self {
            FloatKind::F32 => TensorElementType::Float32,
            FloatKind::F16 => TensorElementType::Float16,
        }
    }

    pub fn tensor(self, shape: Vec<i64>, data: &[f32]) -> Result<DynValue, ModelError> {
        let value = match self {
            FloatKind::F32 => Tensor::from_array((shape, data.to_vec()))
                .map_err(ort_err("create f32 tensor"))?
                .into_dyn(),
            FloatKind::F16 => Tensor::from_array((
                shape,
                data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
            ))
            .map_err(ort_err("create f16 tensor"))?
            .into_dyn(),
        };
        Ok(value)
    }
}

pub(super) fn ort_err<E: Into<ort::Error>>(stage: &'static str) -> impl Fn(E) -> ModelError {
    move |e| ModelError::Ort {
        stage,
        source: e.into(),
    }
}

/// Host copy of a float tensor (f32 or f16), as f32.
pub(super) fn read_floats(
    value: &DynValue,
    stage: &'static str,
) -> Result<(Vec<i64>, Vec<f32>), ModelError> {
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        return Ok((shape.to_vec(), data.to_vec()));
    }
    let (shape, data) = value.try_extract_tensor::<f16>().map_err(ort_err(stage))?;
    Ok((shape.to_vec(), data.iter().map(|v| v.to_f32()).collect()))
}

/// Bytes of a float tensor's data (shape x element size), wherever it lives; an error for other element types.
fn tensor_bytes(tensor: &DynTensor) -> Result<usize, ModelError> {
    let size = match tensor.data_type() {
        TensorElementType::Float32 => 4,
        TensorElementType::Float16 => 2,
        other => {
            return Err(ModelError::Graph(format!(
                "cache or logits of type {other:?}: expected float32 or float16"
            )));
        }
    };
    let elements: i64 = tensor.shape().iter().product();
    Ok(elements.max(0) as usize * size)
}

fn on_host(tensor: &DynTensor) -> bool {
    tensor.memory_info().allocation_device() == AllocationDevice::CPU
}

/// Bytes of a host float tensor's data (shape x element size); an error for device memory or other element
/// types, so raw host writes never run past a buffer.
pub(super) fn host_tensor_bytes(tensor: &DynTensor) -> Result<usize, ModelError> {
    if !on_host(tensor) {
        return Err(ModelError::Graph(format!(
            "tensor in {} memory where host memory was expected",
            tensor_memory(tensor)
        )));
    }
    tensor_bytes(tensor)
}

/// Copies `rows` rows (along the first axis) of `src` from row `from` into `dst` at row `to`. Both must be float
/// tensors of the same type and the same size per row (checked). Host to host is a memcpy; where either lives in
/// device memory (the CUDA slot cache), ONNX Runtime copies ([`copy_rows_through_ort`]).
pub(super) fn copy_rows(
    src: &DynTensor,
    from: usize,
    dst: &mut DynTensor,
    to: usize,
    rows: usize,
) -> Result<(), ModelError> {
    let row = checked_row_bytes(src, from, dst, to, rows)?;
    if !on_host(src) || !on_host(dst) {
        return copy_rows_through_ort(src, from, dst, to, rows);
    }
    // SAFETY: both are host tensors of the same float type (checked above); the byte ranges were checked against
    // their sizes just above, and `src` and `dst` are distinct tensors (`dst` is borrowed mutably).
    unsafe {
        std::ptr::copy_nonoverlapping(
            src.data_ptr().cast::<u8>().add(from * row),
            dst.data_ptr_mut().cast::<u8>().add(to * row),
            rows * row,
        );
    }
    Ok(())
}

/// Bytes per row after checking that rows `from..from + rows` of `src` and `to..to + rows` of `dst` exist and that
/// the two are float tensors of one type with the same row size.
fn checked_row_bytes(
    src: &DynTensor,
    from: usize,
    dst: &DynTensor,
    to: usize,
    rows: usize,
) -> Result<usize, ModelError> {
    let rows_of = |t: &DynTensor| t.shape().first().map_or(0, |&r| r.max(0) as usize);
    let (src_rows, dst_rows) = (rows_of(src), rows_of(dst));
    let (src_bytes, dst_bytes) = (tensor_bytes(src)?, tensor_bytes(dst)?);
    let row = src_bytes / src_rows.max(1);
    if src.data_type() != dst.data_type()
        || src_rows == 0
        || row != dst_bytes / dst_rows.max(1)
        || from + rows > src_rows
        || to + rows > dst_rows
    {
        return Err(ModelError::Graph(format!(
            "cannot copy rows {from}..{} of {:?} into rows {to}.. of {:?}",
            from + rows,
            src.shape(),
            dst.shape()
        )));
    }
    Ok(row)
}

/// The device path of [`copy_rows`], usable on host tensors too (the tests run it there). ONNX Runtime copies
/// into a view of the destination's rows (the row is the outer dimension, so a range of rows is one contiguous
/// region). The source must be a whole, owned tensor: ort (2.0.0-rc.15) binds a borrowed source by first cloning
/// it with the same copy machinery while holding that machinery's lock, which deadlocks (the hang of the first
/// version of this path, 2026-12-03). So a whole source is copied as it is, and part of a source (static batches
/// dropping finished rows) goes through the host: the source to host memory, the rows into an owned host tensor,
/// that tensor into the destination's view.
fn copy_rows_through_ort(
    src: &DynTensor,
    from: usize,
    dst: &mut DynTensor,
    to: usize,
    rows: usize,
) -> Result<(), ModelError> {
    let row = checked_row_bytes(src, from, dst, to, rows)?;
    let src_rows = src.shape().first().map_or(0, |&r| r.max(0) as usize);
    let mut shape: Vec<i64> = src.shape().to_vec();
    shape[0] = rows as i64;
    let whole = from == 0 && rows == src_rows;
    let part;
    let source = if whole {
        src
    } else {
        let host = src
            .to(AllocationDevice::CPU, 0)
            .map_err(ort_err("copy cache rows to the host"))?;
        let mut rows_only = DynTensor::new(
            &ort::memory::Allocator::default(),
            *src.data_type(),
            shape.clone(),
        )
        .map_err(ort_err("allocate host rows"))?;
        copy_rows(&host, from, &mut rows_only, 0, rows)?; // host to host: the memcpy path
        part = rows_only;
        &part
    };
    match src.data_type() {
        TensorElementType::Float16 => copy_into_rows::<f16>(source, dst, to * row, shape),
        _ => copy_into_rows::<f32>(source, dst, to * row, shape),
    }
    .map_err(ort_err("copy cache rows on the device"))
}

/// ONNX Runtime copies all of `src` (a whole tensor of `shape`) into the region at byte `dst_offset` of `dst` (an
/// Identity run on the destination's provider), wherever the two live.
fn copy_into_rows<T: PrimitiveTensorElementType + std::fmt::Debug>(
    src: &DynTensor,
    dst: &mut DynTensor,
    dst_offset: usize,
    shape: Vec<i64>,
) -> ort::Result<()> {
    let i = dst.memory_info();
    let dst_info = MemoryInfo::new(
        i.allocation_device(),
        i.device_id(),
        AllocatorType::Device,
        MemoryType::Default,
    )?;
    // SAFETY: the caller checked that the region (offset + shape x element size) lies inside `dst`, whose element
    // type is T; the view lives only during this copy, while `dst` is borrowed mutably.
    let to = unsafe {
        TensorRefMut::<T>::from_raw(
            dst_info,
            dst.data_ptr_mut().byte_add(dst_offset),
            Shape::new(shape),
        )?
    };
    // A typed view of the owned source shares its value (still owned as far as ort's binding can tell).
    let src = src.view().downcast::<ort::value::TensorValueType<T>>()?;
    src.copy_into(to)
}

/// "Device:id" of a tensor's memory as ONNX Runtime reports it.
pub(super) fn memory_of(value: &DynValue) -> Option<String> {
    let tensor = value
        .view()
        .downcast::<ort::value::DynTensorValueType>()
        .ok()?;
    Some(tensor_memory(&tensor))
}

pub(super) fn tensor_memory(tensor: &DynTensor) -> String {
    let info = tensor.memory_info();
    format!("{}:{}", info.allocation_device().as_str(), info.device_id())
}

#[cfg(test)]
mod tests {
    use ort::memory::Allocator;

    use super::*;
    use crate::model::OrtRuntime;
    use crate::native::{NativeLibrary, SearchPaths};

    /// The path copy_rows takes for device memory, run here on host tensors, where its result can be read: the
    /// same rows land where the memcpy path puts them, for a whole source (a staged prompt's row into its slot) and
    /// for part of one (rows kept by a static batch, through the host). The first version of this path deadlocked
    /// inside ort (a borrowed source is cloned under the copy machinery's own lock); the copy runs on a thread so a
    /// deadlock fails the test instead of hanging it.
    #[test]
    fn rows_copied_through_onnx_runtime_land_where_memcpy_puts_them() {
        let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv");
        let paths = SearchPaths {
            virtualenvs: vec![venv],
            ..Default::default()
        };
        let lib = paths
            .locate(NativeLibrary::OnnxRuntime)
            .expect("libonnxruntime in .venv: run scripts/setup.sh");
        let rt = OrtRuntime::load(lib).expect("ONNX Runtime loads");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let _rt = rt;
            let per_row = 2 * 3 * 5;
            let filled = |rows: i64, offset: f32| -> DynTensor {
                let data: Vec<f16> = (0..rows as usize * per_row)
                    .map(|i| f16::from_f32(offset + i as f32))
                    .collect();
                Tensor::from_array((vec![rows, 2, 3, 5], data))
                    .expect("tensor")
                    .upcast()
            };
            let fresh = || -> DynTensor {
                let mut t = DynTensor::new(
                    &Allocator::default(),
                    TensorElementType::Float16,
                    vec![4i64, 2, 3, 5],
                )
                .expect("buffer");
                copy_rows(&filled(4, 0.0), 0, &mut t, 0, 4).expect("zero");
                t
            };
            let values = |t: &DynTensor| -> Vec<f32> {
                t.try_extract_tensor::<f16>()
                    .expect("f16")
                    .1
                    .iter()
                    .map(|v| v.to_f32())
                    .collect()
            };
            let mut results = Vec::new();
            // (source rows, from, to, rows): a whole one-row source into row 2; rows 1-2 of four into rows 2-3.
            for (src_rows, from, to, rows) in [(1, 0, 2, 1), (4, 1, 2, 2)] {
                let src = filled(src_rows, 1000.0);
                let (mut by_memcpy, mut by_ort) = (fresh(), fresh());
                copy_rows(&src, from, &mut by_memcpy, to, rows).expect("memcpy rows");
                copy_rows_through_ort(&src, from, &mut by_ort, to, rows).expect("ort rows");
                results.push((values(&by_memcpy), values(&by_ort), from, to, rows));
            }
            let _ = done_tx.send(results);
        });
        let results = done_rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the copy through ONNX Runtime finished (a deadlock inside ort never returns)");
        worker.join().expect("copy thread");
        let per_row = 2 * 3 * 5;
        for (by_memcpy, by_ort, from, to, rows) in results {
            assert_eq!(by_memcpy, by_ort, "rows {from}.. -> {to}..");
            let first = (from * per_row) as f32 + 1000.0;
            assert_eq!(by_ort[to * per_row], first);
            assert_eq!(
                by_ort[(to + rows) * per_row - 1],
                first + (rows * per_row - 1) as f32
            );
            // Rows before the target kept their own values.
            assert_eq!(by_ort[per_row], per_row as f32);
        }
    }
}
