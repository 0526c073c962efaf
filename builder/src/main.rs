//! `layerboot`: the build-time half of layerboot (booster's generator, in spirit).
//! This file only parses the command line; the work is in the library (`lib.rs`).

use argh::FromArgs;
use layerboot::{entry, initramfs, inspect, kernel};

#[derive(FromArgs)]
/// Boot machines straight from container images: inspect stores, build the initramfs.
struct Cli {
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Inspect(inspect::Args),
    Initramfs(initramfs::Args),
    Kernel(kernel::Args),
    Entry(entry::Args),
}

fn main() {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("layerboot {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let result = match cli.command {
        Some(Command::Inspect(args)) => inspect::run(args),
        Some(Command::Initramfs(args)) => initramfs::run(args),
        Some(Command::Kernel(args)) => kernel::run(args),
        Some(Command::Entry(args)) => entry::run(args),
        None => Err("no command given (try: layerboot --help)".into()),
    };
    if let Err(e) = result {
        eprintln!("layerboot: {e}");
        std::process::exit(1);
    }
}
