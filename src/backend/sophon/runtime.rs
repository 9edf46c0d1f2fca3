//! A loaded bmodel: the runtime context (`bmrt_create`), its nets and their shapes. Read-only
//! facts are copied out of the runtime's structures into plain Rust values at load, so the rest
//! of the backend never touches a raw pointer from the runtime.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::sync::Arc;

use super::device::Device;
use super::ffi::{DataType, DeviceMem, NetInfo, Shape, Tensor, RUNTIME_SHARE_MEM};
use crate::backend::BackendError;

fn failed(call: &'static str, detail: impl Into<String>) -> BackendError {
    BackendError::Device {
        call,
        detail: detail.into(),
    }
}

/// One input or output of a net, at stage 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    /// Name as compiled (outputs often carry suffixes: find them by position).
    pub name: String,
    /// Element type, if the runtime's code is known.
    pub dtype: Option<DataType>,
    /// Shape at stage 0.
    pub shape: Vec<i32>,
    /// Device memory the runtime made for it (per device for multi-chip nets: the first).
    pub mem: DeviceMem,
}

/// What the runtime says about a net.
#[derive(Debug, Clone, PartialEq)]
pub struct Net {
    /// Net name.
    pub name: String,
    /// Dynamic shapes.
    pub dynamic: bool,
    /// Inputs at stage 0.
    pub inputs: Vec<Port>,
    /// Outputs at stage 0.
    pub outputs: Vec<Port>,
    /// Compiled stages.
    pub stages: usize,
    /// Address mode (1 = io_alone).
    pub addr_mode: i32,
}

/// A runtime context with a bmodel loaded, released (`bmrt_destroy`) on drop, before the
/// device it runs on.
pub struct Loaded {
    device: Arc<Device>,
    ctx: *mut std::ffi::c_void,
    nets: Vec<Net>,
}

// SAFETY: the context is used only through `&mut self`/`&self` methods from the thread that
// owns the backend; moving it between threads is what the engine thread's start does once.
unsafe impl Send for Loaded {}

/// Copies `n` C strings out of a runtime array.
///
/// # Safety
/// `p` points to `n` valid NUL-terminated strings (or is null with `n == 0`).
unsafe fn strings(p: *const *const c_char, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            // SAFETY: in bounds per the caller's contract.
            let s = unsafe { *p.add(i) };
            if s.is_null() {
                String::new()
            } else {
                // SAFETY: a NUL-terminated string owned by the runtime.
                unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
            }
        })
        .collect()
}

/// Copies a net's facts out of the runtime's structure.
///
/// # Safety
/// `info` is a valid `bm_net_info_t` from `bmrt_get_network_info`.
unsafe fn copy_net(info: &NetInfo) -> Result<Net, BackendError> {
    let n_in = usize::try_from(info.input_num).unwrap_or(0);
    let n_out = usize::try_from(info.output_num).unwrap_or(0);
    let stages = usize::try_from(info.stage_num).unwrap_or(0);
    // SAFETY: the runtime's net name.
    let name = unsafe { CStr::from_ptr(info.name) }.to_string_lossy().into_owned();
    if stages == 0 || info.stages.is_null() {
        return Err(failed("bmrt_get_network_info", format!("net {name} has no stages")));
    }
    // SAFETY: stage_num > 0 stages.
    let stage = unsafe { &*info.stages };
    let ports = |names: *const *const c_char, dtypes: *const i32, shapes: *const Shape, mems: *const DeviceMem, n| {
        // SAFETY: the runtime's arrays hold `n` entries each.
        let names = unsafe { strings(names, n) };
        (0..n)
            .map(|i| {
                // SAFETY: i < n for each array.
                let (dtype, shape, mem) = unsafe { (*dtypes.add(i), *shapes.add(i), *mems.add(i)) };
                Port {
                    name: names[i].clone(),
                    dtype: DataType::from_raw(dtype),
                    shape: shape.dims().to_vec(),
                    mem,
                }
            })
            .collect::<Vec<_>>()
    };
    Ok(Net {
        name,
        dynamic: info.is_dynamic,
        inputs: ports(
            info.input_names,
            info.input_dtypes,
            stage.input_shapes,
            stage.input_mems,
            n_in,
        ),
        outputs: ports(
            info.output_names,
            info.output_dtypes,
            stage.output_shapes,
            stage.output_mems,
            n_out,
        ),
        stages,
        addr_mode: info.addr_mode,
    })
}

impl Loaded {
    /// Creates a runtime context on `device` and loads the bmodel at `path`.
    ///
    /// # Errors
    /// The context cannot be made, the file does not load (missing, corrupt, made for another
    /// chip), or a net's description is unusable.
    pub fn load(device: Arc<Device>, path: &Path) -> Result<Loaded, BackendError> {
        let api = &device.runtime().api;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| failed("bmrt_load_bmodel", "the path contains a NUL byte"))?;
        // SAFETY: an open device handle.
        let ctx = device.with_handle(|h| unsafe { (api.rt_create)(h) });
        if ctx.is_null() {
            return Err(failed("bmrt_create", "returned no context"));
        }
        let mut loaded = Loaded {
            device: Arc::clone(&device),
            ctx,
            nets: Vec::new(),
        };
        // SAFETY: a fresh context; the path is NUL-terminated.
        let ok = device.with_handle(|_| unsafe {
            (api.rt_set_flags)(ctx, RUNTIME_SHARE_MEM);
            (api.rt_load_bmodel)(ctx, c_path.as_ptr())
        });
        if !ok {
            return Err(failed("bmrt_load_bmodel", format!("{} did not load", path.display())));
        }
        // SAFETY: a context with a bmodel loaded.
        let count = usize::try_from(unsafe { (api.rt_get_network_number)(ctx) }).unwrap_or(0);
        let mut names: *mut *const c_char = std::ptr::null_mut();
        // SAFETY: the runtime allocates an array of `count` name pointers with malloc.
        unsafe { (api.rt_get_network_names)(ctx, &mut names) };
        if names.is_null() && count > 0 {
            return Err(failed("bmrt_get_network_names", "returned no names"));
        }
        // SAFETY: `count` valid strings owned by the runtime; the array itself is ours to free.
        let net_names = unsafe { strings(names, count) };
        // SAFETY: the array came from the runtime's malloc (its documented contract).
        unsafe { libc_free(names.cast()) };
        for name in net_names {
            let c_name = CString::new(name.clone()).map_err(|_| failed("bmrt_get_network_info", "bad net name"))?;
            // SAFETY: a loaded context and a NUL-terminated name.
            let info = unsafe { (api.rt_get_network_info)(ctx, c_name.as_ptr()) };
            if info.is_null() {
                return Err(failed(
                    "bmrt_get_network_info",
                    format!("no information for net {name}"),
                ));
            }
            // SAFETY: a valid net info from the runtime, alive while the context is.
            loaded.nets.push(unsafe { copy_net(&*info) }?);
        }
        Ok(loaded)
    }

    /// The nets, in the runtime's order.
    pub fn nets(&self) -> &[Net] {
        &self.nets
    }

    /// A net by name.
    pub fn net(&self, name: &str) -> Option<&Net> {
        self.nets.iter().find(|n| n.name == name)
    }
}

/// A net ready to launch: its name and tensors over its own input and output memory (stage 0),
/// made once so that a launch allocates nothing.
pub struct Launch {
    name: CString,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl Launch {
    /// The net's name.
    pub fn name(&self) -> &str {
        self.name.to_str().unwrap_or("?")
    }

    /// Device memory of input `i`.
    pub fn input_mem(&self, i: usize) -> Option<DeviceMem> {
        self.inputs.get(i).map(|t| t.device_mem)
    }

    /// Device memory of output `i`.
    pub fn output_mem(&self, i: usize) -> Option<DeviceMem> {
        self.outputs.get(i).map(|t| t.device_mem)
    }
}

fn tensor(port: &Port) -> Tensor {
    let mut shape = Shape::default();
    for (d, &v) in shape.dims.iter_mut().zip(&port.shape) {
        *d = v;
    }
    shape.num_dims = port.shape.len().min(8) as i32;
    Tensor {
        dtype: port.dtype.map_or(0, |d| d as i32),
        shape,
        device_mem: port.mem,
        st_mode: 0,
    }
}

impl Loaded {
    /// The device the context runs on.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Prepares net `name` for launching.
    ///
    /// # Errors
    /// No such net.
    pub fn prepare(&self, name: &str) -> Result<Launch, BackendError> {
        let net = self
            .net(name)
            .ok_or_else(|| failed("bmrt_launch_tensor_ex", format!("no net named {name}")))?;
        Ok(Launch {
            name: CString::new(name).map_err(|_| failed("bmrt_launch_tensor_ex", "bad net name"))?,
            inputs: net.inputs.iter().map(tensor).collect(),
            outputs: net.outputs.iter().map(tensor).collect(),
        })
    }

    /// Runs a prepared net on its own input memory and waits for it (launches are
    /// asynchronous; the wait must be on this thread, the one that launched).
    ///
    /// # Errors
    /// The launch or the wait fails.
    pub fn launch(&self, net: &mut Launch) -> Result<(), BackendError> {
        let api = &self.device.runtime().api;
        // SAFETY: a loaded context; the tensors describe the net's own stage-0 memory with
        // the counts the runtime reported; user_mem = true keeps the runtime from
        // allocating, user_stmode = false leaves the store mode alone.
        let ok = self.device.with_handle(|_| unsafe {
            (api.rt_launch_tensor_ex)(
                self.ctx,
                net.name.as_ptr(),
                net.inputs.as_ptr(),
                net.inputs.len() as i32,
                net.outputs.as_mut_ptr(),
                net.outputs.len() as i32,
                true,
                false,
            )
        });
        if !ok {
            return Err(failed(
                "bmrt_launch_tensor_ex",
                format!("net {} did not launch", net.name()),
            ));
        }
        self.device.sync()
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let destroy = self.device.runtime().api.rt_destroy;
        // SAFETY: the context came from bmrt_create and is destroyed once, before the device
        // (this struct holds an Arc to it).
        self.device.with_handle(|_| unsafe { destroy(self.ctx) });
    }
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}
