//! The `cachefs` binary: parse the command line, then run the daemon or a subcommand.
//! Exit status: 0 clean exit, 1 runtime failure, 2 bad command line or a dst another
//! daemon serves (nothing mounted).

use cachefs::cli::{self, Action};
use cachefs::{control, daemon};

fn main() {
    let code = match cli::parse(std::env::args_os()) {
        Err(e) => {
            eprintln!("{e}");
            cli::EXIT_USAGE
        }
        Ok(Action::Print(text)) => {
            print!("{text}");
            0
        }
        Ok(Action::Status { dst, json }) => daemon::run_status(&dst, json),
        Ok(Action::Watch {
            dst,
            interval,
            count,
        }) => control::watch::run(&dst, interval, count),
        Ok(Action::Ctl { dst, ctl, json }) => control::client::run_ctl(&dst, &ctl, json),
        Ok(Action::Warmup(w)) => control::warmup::run(&w),
        Ok(Action::Mount(cfg)) => match daemon::run(*cfg) {
            Ok(()) => 0,
            Err(e) => {
                daemon::print_error(&e);
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}
