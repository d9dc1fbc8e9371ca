//! warden's binary: everything lives in the library so tests build the same app.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    warden::cli::main()
}
