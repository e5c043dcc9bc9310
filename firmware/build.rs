//! For the board image only (a bare-metal target): put the chosen board's memory map where cortex-m-rt's
//! `link.x` looks for `memory.x`, and link the binary with it. Host builds (tests) need neither.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=boards");
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let board = match (
        env::var_os("CARGO_FEATURE_BLACK_PILL"),
        env::var_os("CARGO_FEATURE_NETDUINOPLUS2"),
    ) {
        (Some(_), None) => "black-pill",
        (None, Some(_)) => "netduinoplus2",
        // src/bin/board.rs says why with a compile_error!; the library alone still builds.
        _ => return,
    };
    let memory = match fs::read(format!("boards/{board}.x")) {
        Ok(memory) => memory,
        Err(e) => panic!("boards/{board}.x: {e}"),
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    if let Err(e) = fs::write(out.join("memory.x"), memory) {
        panic!("writing memory.x: {e}");
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
}
