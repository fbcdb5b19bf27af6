//! Small helpers over ort's values: float types as the graphs declare them, host copies, raw row copies
//! between host tensors, and where a tensor's memory is.

use half::f16;
use ort::memory::AllocationDevice;
use ort::session::Session;
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, ValueType};

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

/// Bytes of a host float tensor's data (shape x element size); an error for device memory or other element
/// types, so the raw copies below never run past a buffer.
pub(super) fn host_tensor_bytes(tensor: &DynTensor) -> Result<usize, ModelError> {
    if tensor.memory_info().allocation_device() != AllocationDevice::CPU {
        return Err(ModelError::Graph(format!(
            "cache buffer in {} memory: the in-place cache is host memory",
            tensor_memory(tensor)
        )));
    }
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

/// Copies `rows` rows (along the first axis) of host tensor `src` from row `from` into `dst` at row `to`. Both
/// must be host float tensors of the same type and the same size per row (checked).
pub(super) fn copy_rows(
    src: &DynTensor,
    from: usize,
    dst: &mut DynTensor,
    to: usize,
    rows: usize,
) -> Result<(), ModelError> {
    let rows_of = |t: &DynTensor| t.shape().first().map_or(0, |&r| r.max(0) as usize);
    let (src_rows, dst_rows) = (rows_of(src), rows_of(dst));
    let (src_bytes, dst_bytes) = (host_tensor_bytes(src)?, host_tensor_bytes(dst)?);
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
    // SAFETY: both are host tensors of the same float type (checked by `host_tensor_bytes`); the byte ranges were
    // checked against their sizes just above, and `src` and `dst` are distinct tensors (`dst` is borrowed mutably).
    unsafe {
        std::ptr::copy_nonoverlapping(
            src.data_ptr().cast::<u8>().add(from * row),
            dst.data_ptr_mut().cast::<u8>().add(to * row),
            rows * row,
        );
    }
    Ok(())
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
