//! The part of the vendor runtime (libbmlib, libbmrt) the Sophon backend calls, declared by
//! hand from the documented C API (no vendor headers), and loaded at run time with
//! `libloading`: a machine without libsophon runs everything else and gets a clear error only
//! when it asks for this backend.
//!
//! Layouts are those of the LP64 ABI of x86_64 and aarch64; a test pins every size and field
//! offset the backend relies on.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};

use libloading::Library;

/// Where libsophon lives on the SoC and on PCIe hosts.
pub const DEFAULT_LIB_DIR: &str = "/opt/sophon/libsophon-current/lib";

/// The device nodes libsophon's bmlib opens for what this backend does (request a device,
/// allocate and copy memory, launch), as read from libsophon 0.5.1's `bmlib_runtime.cpp`
/// (`bm_create_ctx`, `bm_dev_getcount`) and `bmlib_memory.cpp`; the systemd unit allows each
/// (a test checks). Unverified on hardware: the simulator opens none.
/// `bm-vpp` and, on the SoC, `bce-base` are opened too but may fail without harm.
pub const DEVICE_NODES: [(&str, &str); 4] = [
    (
        "/dev/bm-tpu0",
        "SoC: the TPU (bm_dev_request falls back to /dev/bm-tpuN)",
    ),
    (
        "/dev/ion",
        "SoC: ION carveout heaps, from which every device buffer is allocated",
    ),
    ("/dev/bm-sophonN", "PCIe: one per chip (bm_dev_request)"),
    ("/dev/bmdev-ctl", "bm_dev_getcount: how many devices there are"),
];

/// `bm_handle_t`: an opaque device handle.
pub type Handle = *mut c_void;
/// `bm_status_t`: 0 is success.
pub type Status = c_int;
/// `BM_RUNTIME_SHARE_MEM` for `bmrt_set_flags`: nets share activation memory.
pub const RUNTIME_SHARE_MEM: u32 = 1;

/// `bm_data_type_t`.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// float32.
    F32 = 0,
    /// float16.
    F16 = 1,
    /// int8.
    I8 = 2,
    /// uint8.
    U8 = 3,
    /// int16.
    I16 = 4,
    /// uint16.
    U16 = 5,
    /// int32.
    I32 = 6,
    /// uint32.
    U32 = 7,
    /// bfloat16.
    Bf16 = 8,
    /// int4.
    I4 = 9,
    /// uint4.
    U4 = 10,
}

impl DataType {
    /// From the runtime's integer, if known.
    pub fn from_raw(v: i32) -> Option<DataType> {
        use DataType::*;
        [F32, F16, I8, U8, I16, U16, I32, U32, Bf16, I4, U4]
            .into_iter()
            .find(|d| *d as i32 == v)
    }
}

/// `bm_device_mem_t`: a block of device memory (the device arm of the descriptor's union).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMem {
    /// Device address.
    pub addr: u64,
    /// Reserved by the runtime.
    pub reserved: u32,
    /// dma-buf descriptor, when there is one.
    pub dmabuf_fd: i32,
    /// Memory flags.
    pub flags: u32,
    /// Size in bytes.
    pub size: u32,
}

/// `bm_shape_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    /// Number of dimensions used.
    pub num_dims: i32,
    /// Dimensions (at most 8).
    pub dims: [i32; 8],
}

impl DeviceMem {
    /// A descriptor for `len` bytes at `offset` inside this block, as `bm_mem_from_device`
    /// makes one: the same address arithmetic on the host, nothing allocated. It carries no
    /// dma-buf descriptor, so it must never be freed (only the block it came from is).
    /// `None` when the range does not lie inside the block.
    pub fn slice(&self, offset: usize, len: usize) -> Option<DeviceMem> {
        let end = offset.checked_add(len)?;
        if end > self.size as usize {
            return None;
        }
        Some(DeviceMem {
            addr: self.addr + offset as u64,
            reserved: 0,
            dmabuf_fd: 0,
            flags: 0,
            size: u32::try_from(len).ok()?,
        })
    }
}

impl DataType {
    /// Bytes per element (int4 types round up to one byte: never an activation here).
    pub fn size(self) -> usize {
        use DataType::*;
        match self {
            F32 | I32 | U32 => 4,
            F16 | Bf16 | I16 | U16 => 2,
            I8 | U8 | I4 | U4 => 1,
        }
    }
}

impl Shape {
    /// A shape from dimensions (at most 8 are kept).
    pub fn from_dims(dims: &[i32]) -> Shape {
        let mut shape = Shape::default();
        for (d, &v) in shape.dims.iter_mut().zip(dims) {
            *d = v;
        }
        shape.num_dims = dims.len().min(8) as i32;
        shape
    }

    /// The used dimensions (a corrupt count is clamped to 0..=8).
    pub fn dims(&self) -> &[i32] {
        &self.dims[..self.num_dims.clamp(0, 8) as usize]
    }
}

/// `bm_tensor_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Tensor {
    /// `bm_data_type_t`.
    pub dtype: i32,
    /// Shape.
    pub shape: Shape,
    /// Device memory.
    pub device_mem: DeviceMem,
    /// Storage mode (0: the runtime's default).
    pub st_mode: i32,
}

/// `bm_stage_info_t`: one compiled shape of a net, with its I/O memory.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StageInfo {
    /// `input_num` shapes.
    pub input_shapes: *const Shape,
    /// `output_num` shapes.
    pub output_shapes: *const Shape,
    /// `input_num` device memories (× devices for multi-chip nets).
    pub input_mems: *const DeviceMem,
    /// `output_num` device memories.
    pub output_mems: *const DeviceMem,
}

/// `bm_net_info_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NetInfo {
    /// Net name.
    pub name: *const c_char,
    /// Dynamic shapes.
    pub is_dynamic: bool,
    /// Number of inputs.
    pub input_num: c_int,
    /// Input names.
    pub input_names: *const *const c_char,
    /// Input `bm_data_type_t`s.
    pub input_dtypes: *const i32,
    /// Input quantization scales.
    pub input_scales: *const f32,
    /// Number of outputs.
    pub output_num: c_int,
    /// Output names.
    pub output_names: *const *const c_char,
    /// Output `bm_data_type_t`s.
    pub output_dtypes: *const i32,
    /// Output quantization scales.
    pub output_scales: *const f32,
    /// Number of stages.
    pub stage_num: c_int,
    /// Stages.
    pub stages: *const StageInfo,
    /// Largest input per input, bytes.
    pub max_input_bytes: *const usize,
    /// Largest output per output, bytes.
    pub max_output_bytes: *const usize,
    /// Input zero points.
    pub input_zero_point: *const i32,
    /// Output zero points.
    pub output_zero_point: *const i32,
    /// Device of each input (multi-chip).
    pub input_loc_devices: *const c_int,
    /// Device of each output (multi-chip).
    pub output_loc_devices: *const c_int,
    /// TPU cores used.
    pub core_num: c_int,
    /// Address mode (0 basic, 1 io_alone, ...).
    pub addr_mode: c_int,
}

/// `struct bm_heap_stat`: one device-memory heap, in MiB.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStat {
    /// Size of the heap.
    pub mem_total: c_uint,
    /// Free in it.
    pub mem_avail: c_uint,
    /// In use.
    pub mem_used: c_uint,
}

/// `bm_dev_stat_t`: a device's memory and load (`bm_get_stat`), memory in MiB (the vendor's
/// LLM demos print `mem_used / mem_total` as MB). The simulator answers every field 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevStat {
    /// Device memory, MiB.
    pub mem_total: c_int,
    /// Of it in use, MiB.
    pub mem_used: c_int,
    /// TPU load, percent.
    pub tpu_util: c_int,
    /// Heaps described in `heap_stat`.
    pub heap_num: c_int,
    /// The heaps (on the SoC: NPU, VPU, VPP).
    pub heap_stat: [HeapStat; 4],
}

/// The runtime's entry points, resolved from the loaded libraries.
#[allow(missing_docs)]
pub struct Api {
    pub dev_getcount: unsafe extern "C-unwind" fn(*mut c_int) -> Status,
    pub dev_request: unsafe extern "C-unwind" fn(*mut Handle, c_int) -> Status,
    pub dev_free: unsafe extern "C-unwind" fn(Handle),
    pub malloc_device_byte: unsafe extern "C-unwind" fn(Handle, *mut DeviceMem, c_uint) -> Status,
    pub free_device: unsafe extern "C-unwind" fn(Handle, DeviceMem),
    pub memcpy_s2d: unsafe extern "C-unwind" fn(Handle, DeviceMem, *const c_void) -> Status,
    pub memcpy_s2d_partial: unsafe extern "C-unwind" fn(Handle, DeviceMem, *const c_void, c_uint) -> Status,
    pub memcpy_d2s: unsafe extern "C-unwind" fn(Handle, *mut c_void, DeviceMem) -> Status,
    pub memcpy_d2s_partial: unsafe extern "C-unwind" fn(Handle, *mut c_void, DeviceMem, c_uint) -> Status,
    pub memcpy_d2d_byte: unsafe extern "C-unwind" fn(Handle, DeviceMem, usize, DeviceMem, usize, usize) -> Status,
    pub thread_sync: unsafe extern "C-unwind" fn(Handle) -> Status,
    pub rt_create: unsafe extern "C-unwind" fn(Handle) -> *mut c_void,
    pub rt_create_ex: unsafe extern "C-unwind" fn(*mut Handle, c_int) -> *mut c_void,
    pub rt_destroy: unsafe extern "C-unwind" fn(*mut c_void),
    pub rt_set_flags: unsafe extern "C-unwind" fn(*mut c_void, u32),
    pub rt_load_bmodel: unsafe extern "C-unwind" fn(*mut c_void, *const c_char) -> bool,
    pub rt_get_network_number: unsafe extern "C-unwind" fn(*mut c_void) -> c_int,
    pub rt_get_network_names: unsafe extern "C-unwind" fn(*mut c_void, *mut *mut *const c_char),
    pub rt_get_network_info: unsafe extern "C-unwind" fn(*mut c_void, *const c_char) -> *const NetInfo,
    pub rt_tensor_with_device: unsafe extern "C-unwind" fn(*mut Tensor, DeviceMem, i32, Shape),
    pub rt_launch_tensor_ex: unsafe extern "C-unwind" fn(
        *mut c_void,
        *const c_char,
        *const Tensor,
        c_int,
        *mut Tensor,
        c_int,
        bool,
        bool,
    ) -> bool,
    /// Optional (`None` when the library lacks it): `bm_get_stat`, for `llama-tpu doctor`.
    pub get_stat: Option<unsafe extern "C-unwind" fn(Handle, *mut DevStat) -> Status>,
}

/// The loaded libraries and their entry points. The libraries stay loaded as long as this
/// lives, so the function pointers in [`Api`] stay valid.
pub struct Runtime {
    /// Entry points.
    pub api: Api,
    /// Where the libraries were found.
    pub dir: Option<PathBuf>,
    /// What `libbmrt_version()` says (libsophon 0.5.1 and later), for logs and `info`.
    pub version: Option<String>,
    _bmrt: Library,
    _bmlib: Library,
}

/// The runtime libraries could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the Sophon runtime (libbmlib.so, libbmrt.so); looked in {}: {}", .tried.join(", "), .reason)]
pub struct LoadError {
    /// Places tried, in order.
    pub tried: Vec<String>,
    /// The last loader error.
    pub reason: String,
}

impl Runtime {
    /// Loads libbmlib and libbmrt from `dir` if given, else from libsophon's default folder,
    /// else wherever the dynamic loader finds them (`LD_LIBRARY_PATH`, ld.so.conf).
    ///
    /// # Errors
    /// Neither library set could be loaded, or a needed symbol is missing.
    pub fn load(dir: Option<&Path>) -> Result<Runtime, LoadError> {
        let candidates: Vec<Option<PathBuf>> = match dir {
            Some(d) => vec![Some(d.to_path_buf())],
            None => vec![Some(PathBuf::from(DEFAULT_LIB_DIR)), None],
        };
        let mut tried = Vec::new();
        let mut reason = String::new();
        for dir in candidates {
            tried.push(match &dir {
                Some(d) => d.display().to_string(),
                None => "the dynamic loader's search path".to_string(),
            });
            match Runtime::load_from(dir.as_deref()) {
                Ok(rt) => return Ok(rt),
                // A runtime that is there but too old is the answer: looking further would
                // only hide it behind "not found".
                Err(Failed::TooOld(why)) => return Err(LoadError { tried, reason: why }),
                Err(Failed::NotHere(why)) => reason = why,
            }
        }
        Err(LoadError { tried, reason })
    }

    fn load_from(dir: Option<&Path>) -> Result<Runtime, Failed> {
        Runtime::open_libraries(dir)
            .map_err(Failed::NotHere)
            .and_then(|(bmlib, bmrt)| {
                let where_ = dir.map_or_else(|| "the loader's path".to_string(), |d| d.display().to_string());
                let version =
                    check_version(&bmrt).map_err(|why| Failed::TooOld(format!("libbmrt.so in {where_}: {why}")))?;
                Runtime::resolve(dir, version, bmlib, bmrt).map_err(Failed::NotHere)
            })
    }

    fn open_libraries(dir: Option<&Path>) -> Result<(Library, Library), String> {
        let path = |name: &str| match dir {
            Some(d) => d.join(name).into_os_string(),
            None => name.into(),
        };
        if let Some(d) = dir {
            if let Some(missing) = ["libbmlib.so", "libbmrt.so"].into_iter().find(|n| !d.join(n).exists()) {
                return Err(format!("{missing} is not in {}", d.display()));
            }
        }
        line_buffered_c_stdout();
        // SAFETY: loading runs the libraries' initializers; these are the vendor's runtime
        // libraries, which are made to be loaded into a host process (as its demos do).
        let bmlib = unsafe { Library::new(path("libbmlib.so")) }.map_err(|e| e.to_string())?;
        // libbmrt needs libbmlib: loaded first, its soname is already resolved.
        // SAFETY: as above.
        let bmrt = unsafe { Library::new(path("libbmrt.so")) }.map_err(|e| e.to_string())?;
        Ok((bmlib, bmrt))
    }

    fn resolve(dir: Option<&Path>, version: Option<String>, bmlib: Library, bmrt: Library) -> Result<Runtime, String> {
        macro_rules! sym {
            ($lib:expr, $name:literal) => {
                // SAFETY: the symbol is declared above with the C API's signature; the pointer
                // is copied out and stays valid while `Runtime` keeps the library loaded.
                *unsafe { $lib.get($name) }.map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
            };
        }
        let api = Api {
            dev_getcount: sym!(bmlib, b"bm_dev_getcount"),
            dev_request: sym!(bmlib, b"bm_dev_request"),
            dev_free: sym!(bmlib, b"bm_dev_free"),
            malloc_device_byte: sym!(bmlib, b"bm_malloc_device_byte"),
            free_device: sym!(bmlib, b"bm_free_device"),
            memcpy_s2d: sym!(bmlib, b"bm_memcpy_s2d"),
            memcpy_s2d_partial: sym!(bmlib, b"bm_memcpy_s2d_partial"),
            memcpy_d2s: sym!(bmlib, b"bm_memcpy_d2s"),
            memcpy_d2s_partial: sym!(bmlib, b"bm_memcpy_d2s_partial"),
            memcpy_d2d_byte: sym!(bmlib, b"bm_memcpy_d2d_byte"),
            thread_sync: sym!(bmlib, b"bm_thread_sync"),
            rt_create: sym!(bmrt, b"bmrt_create"),
            rt_create_ex: sym!(bmrt, b"bmrt_create_ex"),
            rt_destroy: sym!(bmrt, b"bmrt_destroy"),
            rt_set_flags: sym!(bmrt, b"bmrt_set_flags"),
            rt_load_bmodel: sym!(bmrt, b"bmrt_load_bmodel"),
            rt_get_network_number: sym!(bmrt, b"bmrt_get_network_number"),
            rt_get_network_names: sym!(bmrt, b"bmrt_get_network_names"),
            rt_get_network_info: sym!(bmrt, b"bmrt_get_network_info"),
            rt_tensor_with_device: sym!(bmrt, b"bmrt_tensor_with_device"),
            rt_launch_tensor_ex: sym!(bmrt, b"bmrt_launch_tensor_ex"),
            // SAFETY: as for `sym!`, but a missing symbol is `None`, not an error.
            get_stat: unsafe { bmlib.get(b"bm_get_stat") }.ok().map(|f| *f),
        };
        Ok(Runtime {
            api,
            dir: dir.map(Path::to_path_buf),
            version,
            _bmrt: bmrt,
            _bmlib: bmlib,
        })
    }
}

/// What [`Runtime::device_stat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatAnswer {
    /// The device's figures.
    Stat(DevStat),
    /// libbmlib has no `bm_get_stat`.
    NoSymbol,
}

impl Runtime {
    /// Device `index`'s memory figures (`bm_get_stat`), on a handle of its own requested and
    /// freed around the call: for a look before a bmodel is loaded (`llama-tpu doctor`).
    ///
    /// # Errors
    /// No such device, or a call fails: the message names the call and its status.
    pub fn device_stat(&self, index: usize) -> Result<StatAnswer, String> {
        let Some(get_stat) = self.api.get_stat else {
            return Ok(StatAnswer::NoSymbol);
        };
        let mut count: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        let status = unsafe { (self.api.dev_getcount)(&mut count) };
        if status != 0 {
            return Err(format!("bm_dev_getcount: status {status}"));
        }
        let Some(id) = c_int::try_from(index).ok().filter(|&i| i < count) else {
            return Err(format!("device {index} does not exist ({} found)", count.max(0)));
        };
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: writes one handle through a valid pointer; `id` is in range.
        let status = unsafe { (self.api.dev_request)(&mut handle, id) };
        if status != 0 || handle.is_null() {
            return Err(format!("bm_dev_request: status {status}"));
        }
        let mut stat = DevStat::default();
        // SAFETY: `handle` was just requested and is live; the struct is `bm_dev_stat_t`'s
        // layout (a test pins its size), written through a valid pointer.
        let status = unsafe { get_stat(handle, &mut stat) };
        // SAFETY: the handle was requested above and is freed once, here; nothing else has it.
        unsafe { (self.api.dev_free)(handle) };
        if status != 0 {
            return Err(format!("bm_get_stat: status {status}"));
        }
        Ok(StatAnswer::Stat(stat))
    }
}

/// Why one candidate folder did not give a runtime.
enum Failed {
    /// Not there, or not loadable: try the next place.
    NotHere(String),
    /// There, but older than the structures this backend reads.
    TooOld(String),
}

/// The libsophon release that brought the structures this backend reads.
pub const MIN_LIBSOPHON: &str = "0.5.1";

/// Checks that `libbmrt` has the layout of `bm_stage_info_t` (with `input_mems` and
/// `output_mems`) and `bm_net_info_t` (up to `addr_mode`) that this backend declares, before
/// any structure is read: an older runtime has the same function names with shorter
/// structures, so a layout mismatch would read garbage, not fail. The layout changed in
/// libsophon 0.5.1 together with the arrival of `bmrt_set_flags` and `bmrt_create_ex`, and
/// every public release with those symbols has the new layout; no library exports a version
/// number, so their presence is the probe. Returns `libbmrt_version()`'s text when it has one.
fn check_version(bmrt: &Library) -> Result<Option<String>, String> {
    // SAFETY: only the symbols' presence is looked at; the pointers are not used.
    let has = |name: &[u8]| unsafe { bmrt.get::<*const c_void>(name) }.is_ok();
    let version = {
        // SAFETY: `libbmrt_version` is `const char* (void)`, returning a static string.
        match unsafe { bmrt.get::<unsafe extern "C-unwind" fn() -> *const c_char>(b"libbmrt_version") } {
            Ok(f) => {
                // SAFETY: a static NUL-terminated string (or null) from the runtime.
                let p = unsafe { f() };
                (!p.is_null()).then(|| {
                    // SAFETY: checked non-null above; the string is static in the library.
                    unsafe { std::ffi::CStr::from_ptr(p) }
                        .to_string_lossy()
                        .trim()
                        .to_string()
                })
            }
            Err(_) => None,
        }
    };
    let missing: Vec<&str> = ["bmrt_set_flags", "bmrt_create_ex"]
        .into_iter()
        .filter(|n| !has(n.as_bytes()))
        .collect();
    if missing.is_empty() {
        Ok(version)
    } else {
        Err(format!(
            "this runtime is older than libsophon {MIN_LIBSOPHON} (it has no {}; {}): its bmodel \
             structures have another layout. Install libsophon {MIN_LIBSOPHON} or newer (and the \
             driver of the same release, as the vendor asks for its LLM demos)",
            missing.join(" or "),
            version.as_deref().unwrap_or("no libbmrt_version")
        ))
    }
}

extern "C" {
    /// The C library's standard output stream (glibc's `stdout`).
    #[link_name = "stdout"]
    static C_STDOUT: *mut c_void;
    fn setvbuf(stream: *mut c_void, buf: *mut std::ffi::c_char, mode: c_int, size: usize) -> c_int;
}

/// Makes the C library's stdout line-buffered, once, before the vendor's libraries print to
/// it: their messages (a `BMRT_ASSERT` first of all) then reach the journal when they are
/// written, not at an exit that may never flush them.
fn line_buffered_c_stdout() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    const IOLBF: c_int = 1;
    // SAFETY: `stdout` is glibc's stream pointer, valid for the process's lifetime; setvbuf
    // with no buffer of ours asks the library to allocate its own. Nothing in this program
    // writes to C's stdout before the vendor's libraries are loaded, which is when this runs.
    ONCE.call_once(|| unsafe {
        setvbuf(C_STDOUT, std::ptr::null_mut(), IOLBF, 0);
    });
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_match_the_c_api() {
        assert_eq!(size_of::<DeviceMem>(), 24);
        assert_eq!((offset_of!(DeviceMem, flags), offset_of!(DeviceMem, size)), (16, 20));
        assert_eq!(size_of::<Shape>(), 36);
        assert_eq!(size_of::<Tensor>(), 72);
        assert_eq!(
            (
                offset_of!(Tensor, shape),
                offset_of!(Tensor, device_mem),
                offset_of!(Tensor, st_mode)
            ),
            (4, 40, 64)
        );
        assert_eq!(size_of::<StageInfo>(), 32);
        assert_eq!(size_of::<NetInfo>(), 144);
        let offsets = [
            offset_of!(NetInfo, is_dynamic),
            offset_of!(NetInfo, input_num),
            offset_of!(NetInfo, input_names),
            offset_of!(NetInfo, output_num),
            offset_of!(NetInfo, output_names),
            offset_of!(NetInfo, stage_num),
            offset_of!(NetInfo, stages),
            offset_of!(NetInfo, max_input_bytes),
            offset_of!(NetInfo, input_loc_devices),
            offset_of!(NetInfo, output_loc_devices),
            offset_of!(NetInfo, core_num),
            offset_of!(NetInfo, addr_mode),
        ];
        assert_eq!(offsets, [8, 12, 16, 40, 48, 72, 80, 88, 120, 128, 136, 140]);
        assert_eq!(DataType::from_raw(8), Some(DataType::Bf16));
        assert_eq!(DataType::from_raw(11), None);
    }

    #[test]
    fn the_device_stat_matches_bmlib() {
        assert_eq!(size_of::<HeapStat>(), 12);
        assert_eq!(size_of::<DevStat>(), 64);
        assert_eq!(
            (offset_of!(DevStat, heap_num), offset_of!(DevStat, heap_stat)),
            (12, 16)
        );
    }

    #[test]
    fn a_missing_runtime_is_a_clear_error_naming_where_it_looked() {
        let dir = Path::new("/nonexistent/sophon/lib");
        let e = Runtime::load(Some(dir)).err().expect("no runtime there");
        let text = e.to_string();
        assert!(text.contains("/nonexistent/sophon/lib"), "{text}");
        assert!(text.contains("libbmlib.so"), "{text}");
    }
}
