//! The netduinoplus2 board image (`firmware::image`). On the host (`cargo build --workspace`) an empty
//! program, so host builds never need the HAL or a linker script.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[cortex_m_rt::entry]
fn main() -> ! {
    firmware::image::run()
}

#[cfg(not(target_os = "none"))]
fn main() {}
