fn main() { eprintln!("load generator: not written yet"); }
