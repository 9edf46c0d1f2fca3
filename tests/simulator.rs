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

/// The bmodel the tpu-mlir wheel ships as a sample (an int8 colour-conversion net).
fn sample_bmodel(lib: &std::path::Path) -> std::path::PathBuf {
    lib.join("../python/tools/soc_infer/demo/Yuv2rgb_0_int8/compilation.bmodel")
}

#[test]
fn simulator_loads_a_bmodel_and_describes_its_nets() {
    use llama_tpu::backend::sophon::runtime::Loaded;
    let lib = common::simulator_lib_dir();
    let rt = Arc::new(Runtime::load(Some(&lib)).unwrap());
    let dev = Arc::new(Device::open(rt, 0).unwrap());
    let loaded = Loaded::load(Arc::clone(&dev), &sample_bmodel(&lib)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.nets().len(), 1, "{:?}", loaded.nets());
    let net = &loaded.nets()[0];
    assert!(!net.name.is_empty());
    assert!(!net.inputs.is_empty() && !net.outputs.is_empty());
    for port in net.inputs.iter().chain(&net.outputs) {
        assert!(port.dtype.is_some(), "{port:?}");
        assert!(!port.shape.is_empty() && port.shape.iter().all(|&d| d > 0), "{port:?}");
        assert!(port.mem.size > 0, "{port:?}");
    }
    assert!(loaded.net(&net.name).is_some());
    // It is not a Llama: the contract check says what is missing.
    let e = llama_tpu::backend::sophon::contract::check(loaded.nets())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no block_N nets"), "{e}");

    // A corrupt file is refused with an error naming the call; the process lives on.
    let dir = common::scratch("sim-corrupt");
    let bytes = std::fs::read(sample_bmodel(&lib)).unwrap();
    let truncated = dir.join("truncated.bmodel");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = dir.join("garbage.bmodel");
    std::fs::write(&garbage, b"not a bmodel at all, just some bytes").unwrap();
    for bad in [truncated, garbage, dir.join("missing.bmodel")] {
        let e = Loaded::load(Arc::clone(&dev), &bad).err().expect("refused").to_string();
        assert!(e.contains("bmrt_load_bmodel"), "{e}");
    }
}

#[test]
fn simulator_info_describes_a_bmodel_and_says_why_it_is_not_a_llama() {
    let lib = common::simulator_lib_dir();
    let out = common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
        .arg("info")
        .arg("--sophon-lib")
        .arg(&lib)
        .arg(sample_bmodel(&lib))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(65), "{stdout}{stderr}");
    assert!(
        stdout.contains("Yuv2rgb_0") && stdout.contains("U8[3, 90, 60]"),
        "{stdout}"
    );
    assert!(
        stderr.contains("does not fit the Llama contract: no block_N nets"),
        "{stderr}"
    );
    let none = common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
        .args(["info", "--sophon-lib", "/nonexistent"])
        .arg(sample_bmodel(&lib))
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&none.stderr).contains("libbmlib.so is not in /nonexistent"));
}
