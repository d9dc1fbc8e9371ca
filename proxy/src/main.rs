//! warden's binary: everything lives in the library so tests build the same app.
#![forbid(unsafe_code)]

/// mimalloc for every Rust allocation of the proxy: its per-thread free lists
/// take the request path's allocations (hyper's 8 KB buffers among them) without
/// the locks and consolidation passes of glibc's malloc; max throughput +4–10%.
/// C libraries (aws-lc) keep the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    warden::cli::main()
}
