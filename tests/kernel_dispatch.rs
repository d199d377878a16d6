//! `FEDBPT_KERNEL` forces the linear layers' kernel: each case runs this test binary again as a
//! child process with the variable set (the choice is made once per process), and the child
//! reports what it chose and what `weights = "auto"` and `"bf16"` resolve to.

use std::process::Command;

use candle_core::Device;
use fedbpt::kernels::{self, Kernel};
use fedbpt::models::linear::{LinearFormat, WeightFormat};

const CHILD: &str = "FEDBPT_KERNEL_DISPATCH_CHILD";
const TEST: &str = "the_environment_variable_forces_the_kernel";

fn child_report() -> String {
    let show = |r: fedbpt::Result<LinearFormat>| match r {
        Ok(f) => f.name(),
        Err(e) => format!("error: {e}"),
    };
    format!(
        "active={} auto={} bf16={}",
        match kernels::active() {
            Ok(k) => k.name().to_string(),
            Err(e) => format!("error: {e}"),
        },
        show(WeightFormat::Auto.resolve(&Device::Cpu)),
        show(WeightFormat::Bf16.resolve(&Device::Cpu)),
    )
}

/// Runs this test in a child with `FEDBPT_KERNEL=value` (or unset) and returns its report.
fn run_child(value: Option<&str>) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", TEST, "--nocapture", "--test-threads=1"]).env(CHILD, "1");
    match value {
        Some(v) => cmd.env(kernels::KERNEL_VAR, v),
        None => cmd.env_remove(kernels::KERNEL_VAR),
    };
    let out = cmd.output().expect("run the child");
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        // The harness prints `test NAME ... ` before the child's line.
        .find_map(|l| l.split_once("REPORT ").map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no report from the child: {stdout}"))
        .to_string()
}

#[test]
fn the_environment_variable_forces_the_kernel() {
    if std::env::var_os(CHILD).is_some() {
        println!("REPORT {}", child_report());
        return;
    }
    let best = Kernel::available_all()[0];
    // Unset: the fastest kernel; auto packs for it unless it is the portable loop.
    let auto =
        if best == Kernel::Portable { "f32".to_string() } else { format!("bf16-{}", best.name()) };
    assert_eq!(
        run_child(None),
        format!("active={} auto={auto} bf16=bf16-{}", best.name(), best.name())
    );
    for kernel in Kernel::ALL {
        let report = run_child(Some(kernel.name()));
        if kernel.available() {
            // Forced, even the portable loop is packed for under auto (so every path runs).
            let n = kernel.name();
            assert_eq!(report, format!("active={n} auto=bf16-{n} bf16=bf16-{n}"));
        } else {
            eprintln!(
                "the {} kernel is not available here: checking that it is refused",
                kernel.name()
            );
            assert!(report.starts_with("active=error: FEDBPT_KERNEL="), "{report}");
            assert!(
                report.contains("cannot run") && report.contains("config key `weights`"),
                "{report}"
            );
        }
    }
    let report = run_child(Some("avx9000"));
    assert!(report.contains("FEDBPT_KERNEL=`avx9000` is not one of"), "{report}");
}
