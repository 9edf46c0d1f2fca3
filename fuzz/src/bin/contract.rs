//! The bmodel contract checker on fabricated net lists: whatever a corrupt or foreign bmodel's
//! nets say (names, counts, shapes, types, stages, address modes), an answer, never a panic.
use llama_tpu::backend::sophon::contract::check;
use llama_tpu::backend::sophon::ffi::{DataType, DeviceMem};
use llama_tpu::backend::sophon::runtime::{Net, Port, Stage};

const NAMES: [&str; 12] = [
    "embedding",
    "embedding_cache",
    "lm_head",
    "greedy_head",
    "sample_head",
    "penalty_sample_head",
    "block_0",
    "block_1",
    "block_cache_0",
    "block_cache_1",
    "block_kv_0",
    "block_kv_1",
];
const PORTS: [&str; 8] = [
    "m_logits",
    "input_ids",
    "penalty",
    "temperature",
    "top_k",
    "top_p",
    "x",
    "hidden",
];

/// Reads the fabricated nets from the bytes, one byte at a time.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn port(&mut self) -> Port {
        let dims = (self.next() % 6) as usize;
        Port {
            name: PORTS[self.next() as usize % PORTS.len()].into(),
            dtype: DataType::from_raw(i32::from(self.next() % 12)),
            shape: (0..dims).map(|_| i32::from(self.next() as i8)).collect(),
            mem: DeviceMem {
                addr: u64::from(self.next()) << 12,
                size: u32::from(self.next()) << 8,
                ..DeviceMem::default()
            },
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let mut b = Bytes(data);
        let mut nets = Vec::new();
        for _ in 0..b.next() % 16 {
            let name = NAMES[b.next() as usize % NAMES.len()].to_string();
            let inputs: Vec<Port> = (0..b.next() % 8).map(|_| b.port()).collect();
            let outputs: Vec<Port> = (0..b.next() % 4).map(|_| b.port()).collect();
            let stages = (0..b.next() % 4)
                .map(|_| Stage {
                    input_shapes: inputs
                        .iter()
                        .map(|p| p.shape.iter().map(|&d| d / (1 + i32::from(b.next() % 3))).collect())
                        .collect(),
                    output_shapes: outputs.iter().map(|p| p.shape.clone()).collect(),
                    input_mems: inputs.iter().map(|p| p.mem).collect(),
                    output_mems: outputs.iter().map(|p| p.mem).collect(),
                })
                .collect();
            nets.push(Net {
                name,
                dynamic: b.next() % 2 == 1,
                inputs,
                outputs,
                stages,
                addr_mode: i32::from(b.next() % 4),
            });
        }
        let _ = check(&nets);
    });
}
