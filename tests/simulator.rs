//! The Sophon backend's runtime layer against the real vendor runtime, running on the BM1684X
//! functional simulator (x86_64 only; `make cross-test` excludes these, visibly).
mod common;

use std::sync::Arc;

use llama_tpu::backend::sophon::device::Device;
use llama_tpu::backend::sophon::ffi::Runtime;

#[test]
fn simulator_runtime_loads_and_device_memory_round_trips() {
    let lib = common::simulator_lib_dir();
    let rt = Arc::new(Runtime::load(Some(&lib)).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(Device::count(&rt).unwrap(), 1, "the simulator has one device");
    let dev = Arc::new(Device::open(Arc::clone(&rt), 0).unwrap());
    let buf = dev.alloc(4096).unwrap();
    assert_eq!(buf.len(), 4096);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    buf.write(&data).unwrap();
    let mut back = vec![0u8; 4096];
    buf.read(&mut back).unwrap();
    assert_eq!(back, data);
    // A partial read is the start of the buffer.
    let mut head = [0u8; 10];
    buf.read(&mut head).unwrap();
    assert_eq!(&head, &data[..10]);
    // Misuse is an error naming the call, not a crash.
    let e = buf.write(&vec![0u8; 5000]).unwrap_err().to_string();
    assert!(e.contains("bm_memcpy_s2d_partial"), "{e}");
    let e = Device::open(Arc::clone(&rt), 1).err().unwrap().to_string();
    assert!(e.contains("device 1 does not exist"), "{e}");
    // (No sync here: bmlib aborts the process when a thread that launched nothing syncs.)
}
