//! Safe handles over the runtime's raw API: a device and its memory. Every call's status is
//! checked and becomes an error naming the call; memory is freed on drop, before the device.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::ffi::{DeviceMem, Handle, Runtime};
use crate::backend::BackendError;
pub use crate::backend::Traffic;

fn failed(call: &'static str, detail: impl Into<String>) -> BackendError {
    BackendError::Device {
        call,
        detail: detail.into(),
    }
}

fn check(call: &'static str, status: i32) -> Result<(), BackendError> {
    if status == 0 {
        Ok(())
    } else {
        Err(failed(call, format!("status {status}")))
    }
}

/// The live counters behind [`Traffic`].
#[derive(Debug, Default)]
pub struct Counters {
    launches: AtomicU64,
    syncs: AtomicU64,
    h2d_calls: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_calls: AtomicU64,
    d2h_bytes: AtomicU64,
    d2d_calls: AtomicU64,
    d2d_bytes: AtomicU64,
}

impl Counters {
    /// The figures so far.
    pub fn snapshot(&self) -> Traffic {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Traffic {
            launches: r(&self.launches),
            syncs: r(&self.syncs),
            h2d_calls: r(&self.h2d_calls),
            h2d_bytes: r(&self.h2d_bytes),
            d2h_calls: r(&self.d2h_calls),
            d2h_bytes: r(&self.d2h_bytes),
            d2d_calls: r(&self.d2d_calls),
            d2d_bytes: r(&self.d2d_bytes),
        }
    }

    /// One net launched.
    pub fn count_launch(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    fn add(calls: &AtomicU64, bytes: &AtomicU64, n: usize) {
        calls.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An open device (`bm_dev_request`), released (`bm_dev_free`) on drop.
///
/// Runtime contract (not enforced here): work launched on a device must be synchronized from
/// the thread that launched it; `bm_thread_sync` on a thread that launched nothing aborts the
/// process inside bmlib. The backend does both on the engine thread.
///
/// Launches are asynchronous and a host copy is not ordered after them: a copy made while a
/// launch is queued can change an input before the launch reads it, or read an output before
/// it is written. So every copy (either way, and on the device) first waits for the work in
/// flight: a caller cannot forget to.
pub struct Device {
    rt: Arc<Runtime>,
    handle: Handle,
    index: usize,
    /// Held across every runtime call on this handle: calls never overlap.
    calls: Mutex<()>,
    traffic: Counters,
    /// Something was launched since the last sync.
    in_flight: AtomicBool,
}

// SAFETY: the handle is an opaque token passed only to the runtime's calls, and every such
// call is made under `calls`, so no two threads use it at once; bmlib does not tie a handle to
// the thread that requested it (only launched work to the launching thread, see above).
unsafe impl Send for Device {}
// SAFETY: as for Send: shared access goes through `calls`.
unsafe impl Sync for Device {}

impl Device {
    /// Number of devices the runtime sees.
    ///
    /// # Errors
    /// The call fails.
    pub fn count(rt: &Runtime) -> Result<usize, BackendError> {
        let mut n = 0;
        // SAFETY: writes one int through a valid pointer.
        check("bm_dev_getcount", unsafe { (rt.api.dev_getcount)(&mut n) })?;
        Ok(n.max(0) as usize)
    }

    /// Opens device `index`.
    ///
    /// # Errors
    /// No such device, or the request fails.
    pub fn open(rt: Arc<Runtime>, index: usize) -> Result<Device, BackendError> {
        let count = Device::count(&rt)?;
        if index >= count {
            return Err(failed(
                "bm_dev_request",
                format!("device {index} does not exist ({count} found)"),
            ));
        }
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: writes one handle through a valid pointer; `index` is in range.
        check("bm_dev_request", unsafe {
            (rt.api.dev_request)(&mut handle, index as i32)
        })?;
        if handle.is_null() {
            return Err(failed("bm_dev_request", "returned no handle"));
        }
        Ok(Device {
            rt,
            handle,
            index,
            calls: Mutex::new(()),
            traffic: Counters::default(),
            in_flight: AtomicBool::new(false),
        })
    }

    /// The device index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs `f` with the raw handle, no other call on this device overlapping it. While it
    /// runs, [`unfinished_call`] is set; it stays set if the call never returns.
    pub fn with_handle<T>(&self, f: impl FnOnce(Handle) -> T) -> T {
        let _guard = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let unfinished = unfinished_call();
        unfinished.store(true, Ordering::SeqCst);
        let result = f(self.handle);
        unfinished.store(false, Ordering::SeqCst);
        result
    }

    /// What was asked of this device so far.
    pub fn traffic(&self) -> &Counters {
        &self.traffic
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// Allocates `bytes` of device memory.
    ///
    /// # Errors
    /// Out of device memory.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer, BackendError> {
        let size =
            u32::try_from(bytes).map_err(|_| failed("bm_malloc_device_byte", format!("{bytes} bytes is too large")))?;
        let mut mem = DeviceMem::default();
        // SAFETY: writes one descriptor through a valid pointer on an open device.
        check(
            "bm_malloc_device_byte",
            self.with_handle(|h| unsafe { (self.rt.api.malloc_device_byte)(h, &mut mem, size) }),
        )?;
        Ok(DeviceBuffer {
            device: Arc::clone(self),
            mem,
        })
    }

    /// Records that work was launched on this device: the next copy or
    /// [`settle`](Self::settle) waits for it.
    pub fn launched(&self) {
        self.in_flight.store(true, Ordering::Relaxed);
    }

    /// Waits for the work launched since the last wait, if any: on the thread that launched
    /// it (see the type's documentation).
    ///
    /// # Errors
    /// The device reports a failure.
    pub fn settle(&self) -> Result<(), BackendError> {
        if self.in_flight.swap(false, Ordering::Relaxed) {
            self.sync()?;
        }
        Ok(())
    }

    /// Waits for the work this thread launched to finish. Call it only on a thread that
    /// launched work on this device (see the type's documentation).
    ///
    /// # Errors
    /// The device reports a failure.
    fn sync(&self) -> Result<(), BackendError> {
        self.traffic.syncs.fetch_add(1, Ordering::Relaxed);
        // SAFETY: an open handle.
        check(
            "bm_thread_sync",
            self.with_handle(|h| unsafe { (self.rt.api.thread_sync)(h) }),
        )
    }

    /// Copies `data` to device memory `mem` (which must be at least as large).
    ///
    /// # Errors
    /// `data` is larger than `mem`, or the copy fails.
    pub fn write(&self, mem: DeviceMem, data: &[u8]) -> Result<(), BackendError> {
        if data.len() > mem.size as usize {
            return Err(failed(
                "bm_memcpy_s2d_partial",
                format!("{} bytes into {}", data.len(), mem.size),
            ));
        }
        self.settle()?;
        Counters::add(&self.traffic.h2d_calls, &self.traffic.h2d_bytes, data.len());
        let copy = self.rt.api.memcpy_s2d_partial;
        // SAFETY: `data` is valid for its length, which fits the device memory.
        let status = self.with_handle(|h| unsafe { copy(h, mem, data.as_ptr().cast::<c_void>(), data.len() as u32) });
        check("bm_memcpy_s2d_partial", status)
    }

    /// Copies `data` to device memory `mem` at byte `offset`.
    ///
    /// # Errors
    /// The range does not lie inside `mem`, or the copy fails.
    pub fn write_at(&self, mem: DeviceMem, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        let target = mem.slice(offset, data.len()).ok_or_else(|| {
            failed(
                "bm_memcpy_s2d_partial",
                format!("{} bytes at offset {offset} of {}", data.len(), mem.size),
            )
        })?;
        self.write(target, data)
    }

    /// Copies the start of device memory `mem` into `out`.
    ///
    /// # Errors
    /// `out` is larger than `mem`, or the copy fails.
    pub fn read(&self, mem: DeviceMem, out: &mut [u8]) -> Result<(), BackendError> {
        if out.len() > mem.size as usize {
            return Err(failed(
                "bm_memcpy_d2s_partial",
                format!("{} bytes from {}", out.len(), mem.size),
            ));
        }
        self.settle()?;
        Counters::add(&self.traffic.d2h_calls, &self.traffic.d2h_bytes, out.len());
        let copy = self.rt.api.memcpy_d2s_partial;
        // SAFETY: `out` is valid for writes of its length, which fits the device memory.
        let status = self.with_handle(|h| unsafe { copy(h, out.as_mut_ptr().cast::<c_void>(), mem, out.len() as u32) });
        check("bm_memcpy_d2s_partial", status)
    }

    /// Copies `len` bytes on the device, from `src` at `src_offset` to `dst` at `dst_offset`.
    ///
    /// # Errors
    /// A range outside either block, or the copy fails.
    pub fn copy(
        &self,
        dst: DeviceMem,
        dst_offset: usize,
        src: DeviceMem,
        src_offset: usize,
        len: usize,
    ) -> Result<(), BackendError> {
        let fits = |m: DeviceMem, off: usize| off.checked_add(len).is_some_and(|end| end <= m.size as usize);
        if !fits(dst, dst_offset) || !fits(src, src_offset) {
            return Err(failed(
                "bm_memcpy_d2d_byte",
                format!(
                    "{len} bytes from offset {src_offset} of {} to offset {dst_offset} of {}",
                    src.size, dst.size
                ),
            ));
        }
        self.settle()?;
        Counters::add(&self.traffic.d2d_calls, &self.traffic.d2d_bytes, len);
        let copy = self.rt.api.memcpy_d2d_byte;
        // SAFETY: both ranges lie inside their device blocks (checked above).
        let status = self.with_handle(|h| unsafe { copy(h, dst, dst_offset, src, src_offset, len) });
        check("bm_memcpy_d2d_byte", status)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if runtime_abandoned() {
            return;
        }
        // SAFETY: the handle came from bm_dev_request and is released once; buffers hold an
        // Arc to the device, so none outlives it.
        unsafe { (self.rt.api.dev_free)(self.handle) }
    }
}

/// Set while a call into the vendor's runtime runs, and left set by one that never returned:
/// the runtime's asserts are C++ exceptions, which unwind through the caller. After that the
/// runtime's state is unknown (its locks may be held, a teardown can wait forever), so
/// nothing calls into it again: buffers, contexts and devices are left to the process's
/// end, and the CLI turns the abort that ends such an unwinding into exit 69
/// (`sys::signals::exit_on_abort_while`).
pub fn unfinished_call() -> &'static Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Whether a runtime call never returned (see [`unfinished_call`]): teardown skips the runtime.
pub fn runtime_abandoned() -> bool {
    unfinished_call().load(Ordering::SeqCst)
}

/// Device memory made by the backend, freed on drop.
pub struct DeviceBuffer {
    device: Arc<Device>,
    mem: DeviceMem,
}

impl DeviceBuffer {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.mem.size as usize
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.mem.size == 0
    }

    /// The descriptor, for runtime calls.
    pub fn mem(&self) -> DeviceMem {
        self.mem
    }

    /// Copies `data` to the start of the buffer.
    ///
    /// # Errors
    /// `data` is larger than the buffer, or the copy fails.
    pub fn write(&self, data: &[u8]) -> Result<(), BackendError> {
        self.device.write(self.mem, data)
    }

    /// Copies the start of the buffer into `out`.
    ///
    /// # Errors
    /// `out` is larger than the buffer, or the copy fails.
    pub fn read(&self, out: &mut [u8]) -> Result<(), BackendError> {
        self.device.read(self.mem, out)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if runtime_abandoned() {
            return;
        }
        let free = self.device.rt.api.free_device;
        // SAFETY: the memory came from bm_malloc_device_byte on this device and is freed once.
        self.device.with_handle(|h| unsafe { free(h, self.mem) })
    }
}
