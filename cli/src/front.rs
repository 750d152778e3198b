//! `hb`: the command people type. It serves the container commands itself (`hb run` when a
//! daemon serves the image; `ps`, `stop`, `kill`, `rm`, `logs`, `exec`), linking only the
//! store-free `hb_cli` library so a container starts with a millisecond of hb around it; any
//! other command (and `--help`, `--version`, usage errors, `hb run` without a daemon) becomes
//! `hb-engine` by exec: same process, same arguments.
//!
//! Exit codes: those of `hb-engine`; a container's own exit code for `hb run`.

use std::process::ExitCode;

use clap::Parser;
use hb_cli::{output, ContainerCmd, Global, Outcome};

#[derive(Parser)]
#[command(name = "hb")]
struct FrontCli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: ContainerCmd,
}

fn main() -> ExitCode {
    // Anything this parser does not take, the engine answers (its help, its errors).
    let Ok(cli) = FrontCli::try_parse() else { return engine() };
    output::init_logging(cli.global.verbose);
    match hb_cli::container_command(&cli.global, cli.cmd, None) {
        Ok(Outcome::Done(code)) => code,
        Ok(Outcome::Engine) => engine(),
        Err(e) => {
            eprintln!("hb: error: {}", hb_cli::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Becomes `hb-engine` with this process's arguments; returns only if that fails.
fn engine() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = hb_cli::engine_exe();
    let err = std::process::Command::new(&exe).arg0("hb").args(std::env::args_os().skip(1)).exec();
    eprintln!("hb: error: cannot run {}: {err} (hb-engine belongs beside hb)", exe.display());
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::FrontCli::command().debug_assert();
    }
}
