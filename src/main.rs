//! Thin entry point; everything lives in the library.

fn main() -> std::process::ExitCode {
    // When re-executed as the watchdog's native-stack helper, do that and exit.
    vpnbot::diagnostics::stack::maybe_run_child();
    vpnbot::cli::main()
}
