//! Prints the first values of a tensor row as this crate dequantizes them (debugging aid).
//! `cargo run --example dequant_row -- MODEL.gguf TENSOR ROW`
use llama_tpu::kernels::quant::dequantize_row;
use llama_tpu::model::{Gguf, MappedFile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let file = MappedFile::open(std::path::Path::new(&a[1]))?;
    let g = Gguf::parse(&file)?;
    let t = g.tensor(&a[2]).ok_or("no such tensor")?;
    let row: usize = a[3].parse()?;
    let cols = t.dims[0] as usize;
    let rb = t.ty.row_bytes(cols);
    let start = t.offset as usize + row * rb;
    let mut out = vec![0f32; cols];
    dequantize_row(t.ty, &file[start..start + rb], &mut out);
    println!("{:?}", &out[..8]);
    println!("{:?}", &out[cols - 8..]);
    Ok(())
}
