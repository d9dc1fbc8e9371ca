//! Link-time layout of the release `warden` binary.
//!
//! Two linker options, and only where they are known to work, so a build never fails for them:
//!
//! - **Symbol order.** `proxy/symbol-order.txt` lists the functions start-up and the request path
//!   run (written by `benches/load/run --symbol-order`). lld lays them out first and together. The
//!   kernel maps a binary's text 64 KiB around each page touched, so scattered functions make most
//!   of the 13 MB of text resident; grouped, well under half is. Only lld reads an order file, so the
//!   build links with the toolchain's own lld (`gcc-ld/ld.lld`, what rustc uses by default on
//!   x86_64 Linux since 1.90) and skips the option where the toolchain has none.
//! - **Packed relative relocations** (`DT_RELR`). The position-independent binary carries about
//!   0.8 MB of relocations that the loader reads at start; packed, they are a few kilobytes. glibc
//!   reads them from 2.36 on, so this is applied only to a native build on such a glibc.
//!
//! Neither changes what the binary does. `WARDEN_PLAIN_LINK=1` turns both off, for comparison.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const ORDER_FILE: &str = "proxy/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=WARDEN_PLAIN_LINK");

    let var = |name: &str| env::var(name).unwrap_or_default();
    let (target, host) = (var("TARGET"), var("HOST"));
    if var("PROFILE") != "release"
        || !target.ends_with("-linux-gnu")
        || var("WARDEN_PLAIN_LINK") == "1"
    {
        return;
    }

    let Some(lld_dir) = toolchain_lld(&var("RUSTC"), &host) else {
        println!("cargo:warning=no gcc-ld/ld.lld in the toolchain: linking without a symbol order");
        return;
    };
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join(ORDER_FILE);
    println!("cargo:rustc-link-arg-bins=-B{}", lld_dir.display());
    println!("cargo:rustc-link-arg-bins=-fuse-ld=lld");
    // The linker reads a copy in this script's own output directory: cargo may
    // reuse this script's output for a checkout at another path (a moved
    // checkout, or a second one sharing the target directory), where a path
    // into the first checkout would name a file that is gone.
    let copy = Path::new(&var("OUT_DIR")).join("symbol-order.txt");
    if order.is_file() && std::fs::copy(&order, &copy).is_ok() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            copy.display()
        );
        // Names the order file lists but this build lacks (a changed dependency) are skipped.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
    if target == host && native_glibc_at_least(2, 36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// `<sysroot>/lib/rustlib/<host>/bin/gcc-ld`, when it holds the `ld.lld` wrapper.
fn toolchain_lld(rustc: &str, host: &str) -> Option<PathBuf> {
    let rustc = if rustc.is_empty() { "rustc" } else { rustc };
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/gcc-ld");
    dir.join("ld.lld").is_file().then_some(dir)
}

/// Whether this machine's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36") is at least major.minor.
fn native_glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}
