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

/// One compiled shape of a net (a net compiled for several input lengths has several).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stage {
    /// Input shapes.
    pub input_shapes: Vec<Vec<i32>>,
    /// Output shapes.
    pub output_shapes: Vec<Vec<i32>>,
    /// Input memory the runtime made for this stage.
    pub input_mems: Vec<DeviceMem>,
    /// Output memory the runtime made for this stage.
    pub output_mems: Vec<DeviceMem>,
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
    /// Every compiled stage (stage 0 is also described by `inputs` and `outputs`).
    pub stages: Vec<Stage>,
    /// Address mode (0 basic: its I/O lies in the activation memory all nets share; 1
    /// io_alone: private I/O memory).
    pub addr_mode: i32,
}

/// `addr_mode` of a net compiled `--addr_mode io_alone`.
pub const IO_ALONE: i32 = 1;

impl Net {
    /// Whether its I/O memory is its own (io_alone): what is left there stays.
    pub fn io_alone(&self) -> bool {
        self.addr_mode == IO_ALONE
    }

    /// Index of the input named `name`, if any.
    pub fn input_named(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|p| p.name == name)
    }
}

/// A runtime context with a bmodel loaded, released (`bmrt_destroy`) on drop, before the
/// devices it runs on.
pub struct Loaded {
    /// The devices, in the order given to the runtime (a multi-chip bmodel's nets carry one
    /// group of inputs and outputs per device, in this order).
    devices: Vec<Arc<Device>>,
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
    // SAFETY: stage_num > 0 stages, each with input_num/output_num shapes and memories.
    let all: Vec<Stage> = (0..stages)
        .map(|s| {
            // SAFETY: s < stage_num.
            let st = unsafe { &*info.stages.add(s) };
            // SAFETY: the runtime's per-stage arrays hold n_in / n_out entries.
            unsafe {
                Stage {
                    input_shapes: (0..n_in).map(|i| (*st.input_shapes.add(i)).dims().to_vec()).collect(),
                    output_shapes: (0..n_out).map(|i| (*st.output_shapes.add(i)).dims().to_vec()).collect(),
                    input_mems: (0..n_in).map(|i| *st.input_mems.add(i)).collect(),
                    output_mems: (0..n_out).map(|i| *st.output_mems.add(i)).collect(),
                }
            }
        })
        .collect();
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
        stages: all,
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
        Loaded::load_on(vec![device], path)
    }

    /// The same on several devices (a multi-chip PCIe bmodel: `bmrt_create_ex`).
    ///
    /// # Errors
    /// As for [`Loaded::load`]; no device given.
    pub fn load_on(devices: Vec<Arc<Device>>, path: &Path) -> Result<Loaded, BackendError> {
        let Some(device) = devices.first().cloned() else {
            return Err(failed("bmrt_create", "no device"));
        };
        let api = &device.runtime().api;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| failed("bmrt_load_bmodel", "the path contains a NUL byte"))?;
        let ctx = if devices.len() == 1 {
            // SAFETY: an open device handle.
            device.with_handle(|h| unsafe { (api.rt_create)(h) })
        } else {
            let mut handles: Vec<_> = devices.iter().map(|d| d.with_handle(|h| h)).collect();
            // SAFETY: open device handles, as many as the count passed; the runtime copies
            // them (the array need not outlive the call).
            device.with_handle(|_| unsafe { (api.rt_create_ex)(handles.as_mut_ptr(), handles.len() as i32) })
        };
        if ctx.is_null() {
            return Err(failed("bmrt_create", "returned no context"));
        }
        let mut loaded = Loaded {
            devices: devices.clone(),
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

/// A net ready to launch: its name and one tensor per input and output, made once so that a
/// launch allocates nothing. The tensors start over the net's own stage memory; the backend
/// points them at its own buffers (or slices of them) and, for dynamic nets, sets the real
/// lengths in their shapes before each launch.
pub struct Launch {
    name: CString,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    /// The outputs' compiled shapes: the runtime writes a launch's real output shapes back
    /// into the tensors, and a dynamic net given those shapes again writes its outputs
    /// elsewhere, so every launch starts from these (as the vendor's demos build fresh
    /// tensors from the net's description for each launch).
    output_shapes: Vec<Shape>,
    /// Devices it runs on: all of the context's (a net of the multi-chip layout, one group
    /// of inputs and outputs per device, in the context's device order) or the first only.
    devices: usize,
}

impl Launch {
    /// The net's name.
    pub fn name(&self) -> &str {
        self.name.to_str().unwrap_or("?")
    }

    /// Devices it runs on.
    pub fn devices(&self) -> usize {
        self.devices
    }

    fn group(len: usize, devices: usize, i: usize, d: usize) -> Option<usize> {
        let per = len / devices.max(1);
        (i < per && d < devices).then_some(i + d * per)
    }

    /// Input `i` of device `d`'s group.
    pub fn input(&mut self, i: usize, d: usize) -> Option<&mut Tensor> {
        let k = Launch::group(self.inputs.len(), self.devices, i, d)?;
        self.inputs.get_mut(k)
    }

    /// Output `i` of device `d`'s group.
    pub fn output(&mut self, i: usize, d: usize) -> Option<&mut Tensor> {
        let k = Launch::group(self.outputs.len(), self.devices, i, d)?;
        self.outputs.get_mut(k)
    }

    /// Device memory of input `i` of device `d`'s group.
    pub fn input_mem(&self, i: usize, d: usize) -> Option<DeviceMem> {
        let k = Launch::group(self.inputs.len(), self.devices, i, d)?;
        self.inputs.get(k).map(|t| t.device_mem)
    }

    /// Device memory of output `i` of device `d`'s group.
    pub fn output_mem(&self, i: usize, d: usize) -> Option<DeviceMem> {
        let k = Launch::group(self.outputs.len(), self.devices, i, d)?;
        self.outputs.get(k).map(|t| t.device_mem)
    }

    /// Shape of output `i` of device 0's group: what the runtime wrote back after the last
    /// launch (a dynamic net's real output length).
    pub fn output_dims(&self, i: usize) -> &[i32] {
        self.outputs.get(i).map_or(&[], |t| t.shape.dims())
    }

    /// Points output `i` of device `d`'s group at `mem` (its shape stays the compiled one:
    /// the runtime checks an output's memory against that, see [`Loaded::launch`]).
    pub fn set_output(&mut self, i: usize, d: usize, mem: Option<DeviceMem>) {
        if let Some(t) = self.output(i, d) {
            t.device_mem = mem.unwrap_or_default();
        }
    }
}

/// Bytes a tensor's shape asks for (0 for a negative dimension: refused by `fits`).
fn bytes_of(t: &Tensor) -> u64 {
    let size = DataType::from_raw(t.dtype).map_or(4, DataType::size) as u64;
    t.shape
        .dims()
        .iter()
        .try_fold(size, |n, &d| u64::try_from(d).ok().and_then(|d| n.checked_mul(d)))
        .unwrap_or(u64::MAX)
}

/// What bmrt's `fill_dynamic_tensor_info` asserts: the memory, rounded up to its 4 KiB
/// pages, holds the shape.
fn fits(t: &Tensor) -> bool {
    bytes_of(t) <= u64::from(t.device_mem.size).div_ceil(4096) * 4096
}

fn tensor(port: &Port) -> Tensor {
    Tensor {
        dtype: port.dtype.map_or(0, |d| d as i32),
        shape: Shape::from_dims(&port.shape),
        device_mem: port.mem,
        st_mode: 0,
    }
}

impl Loaded {
    /// The first device the context runs on (the only one, but for multi-chip bmodels).
    pub fn device(&self) -> &Arc<Device> {
        &self.devices[0]
    }

    /// All its devices, in the runtime's order.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// Prepares net `name` for launching on the first device, at stage `stage` (its tensors
    /// over that stage's memory and shapes).
    ///
    /// # Errors
    /// No such net or stage.
    pub fn prepare(&self, name: &str, stage: usize) -> Result<Launch, BackendError> {
        self.prepare_on(name, stage, 1)
    }

    /// Prepares a net that spans all the context's devices (one input/output group each).
    ///
    /// # Errors
    /// No such net or stage.
    pub fn prepare_spanning(&self, name: &str, stage: usize) -> Result<Launch, BackendError> {
        self.prepare_on(name, stage, self.devices.len())
    }

    fn prepare_on(&self, name: &str, stage: usize, devices: usize) -> Result<Launch, BackendError> {
        let net = self
            .net(name)
            .ok_or_else(|| failed("bmrt_launch_tensor_ex", format!("no net named {name}")))?;
        let st = net
            .stages
            .get(stage)
            .ok_or_else(|| failed("bmrt_launch_tensor_ex", format!("net {name} has no stage {stage}")))?;
        let at = |ports: &[Port], shapes: &[Vec<i32>], mems: &[DeviceMem]| -> Vec<Tensor> {
            ports
                .iter()
                .zip(shapes.iter().zip(mems))
                .map(|(p, (shape, mem))| {
                    let mut t = tensor(p);
                    t.shape = Shape::from_dims(shape);
                    t.device_mem = *mem;
                    t
                })
                .collect()
        };
        let outputs = at(&net.outputs, &st.output_shapes, &st.output_mems);
        Ok(Launch {
            name: CString::new(name).map_err(|_| failed("bmrt_launch_tensor_ex", "bad net name"))?,
            inputs: at(&net.inputs, &st.input_shapes, &st.input_mems),
            output_shapes: outputs.iter().map(|t| t.shape).collect(),
            outputs,
            devices,
        })
    }

    /// Queues a prepared net on its tensors. Launches are asynchronous and run in order:
    /// [`Loaded::finish`] waits for them before results are read.
    ///
    /// # Errors
    /// The runtime refuses the launch.
    pub fn launch(&self, net: &mut Launch) -> Result<(), BackendError> {
        let device = self.device();
        let api = &device.runtime().api;
        device.traffic().count_launch();
        let launch_no = device.traffic().snapshot().launches;
        if crate::faults::device_fails(launch_no) {
            return Err(failed(
                "bmrt_launch_tensor_ex",
                format!("net {} did not launch (fault injected)", net.name()),
            ));
        }
        for (t, shape) in net.outputs.iter_mut().zip(&net.output_shapes) {
            t.shape = *shape;
        }
        // The runtime asserts what is checked here (bmrt's fill_dynamic_tensor_info: an
        // input's memory holds the shape given, an output's the compiled one), and its
        // assert is a C++ exception no caller can catch: a tensor too small is refused
        // before it gets there.
        let unchecked = crate::faults::runtime_asserts(launch_no);
        if unchecked {
            // A first output with no memory.
            if let Some(t) = net.outputs.first_mut() {
                t.device_mem.size = 0;
            }
        }
        for (what, list) in [("input", &net.inputs), ("output", &net.outputs)] {
            if unchecked {
                break;
            }
            if let Some((i, t)) = list.iter().enumerate().find(|(_, t)| !fits(t)) {
                return Err(failed(
                    "bmrt_launch_tensor_ex",
                    format!(
                        "net {} {what} {i}: shape {:?} needs {} bytes, its device memory holds {}",
                        net.name(),
                        t.shape.dims(),
                        bytes_of(t),
                        t.device_mem.size
                    ),
                ));
            }
        }
        // SAFETY: a loaded context; the tensors have the counts the runtime reported for the
        // net and each points at device memory at least as large as its shape (the backend
        // sizes its buffers from the nets' shapes; slices are range-checked when made);
        // user_mem = true keeps the runtime from allocating, user_stmode = false leaves the
        // store mode alone. The runtime writes output shapes back, into our own tensors.
        let ok = device.with_handle(|_| unsafe {
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
        for d in &self.devices[..net.devices.min(self.devices.len())] {
            d.launched();
        }
        Ok(())
    }

    /// Waits for everything launched since the last wait (on this thread, the one that
    /// launched): one sync per device that ran something. (Every copy waits too: see
    /// [`Device`].)
    ///
    /// # Errors
    /// A device reports a failure.
    pub fn finish(&self) -> Result<(), BackendError> {
        for d in &self.devices {
            d.settle()?;
        }
        Ok(())
    }

    /// What the backend asked of its devices so far, summed over them.
    pub fn traffic(&self) -> super::device::Traffic {
        self.devices.iter().map(|d| d.traffic().snapshot()).sum()
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if super::device::runtime_abandoned() {
            return;
        }
        let device = self.device();
        let destroy = device.runtime().api.rt_destroy;
        // SAFETY: the context came from bmrt_create(_ex) and is destroyed once, before the
        // devices (this struct holds an Arc to each).
        device.with_handle(|_| unsafe { destroy(self.ctx) });
    }
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}
