//! Thin main; the logic lives in the library. (not yet implemented)
fn main() {
    eprintln!("error: not yet implemented");
    std::process::exit(1);
}
