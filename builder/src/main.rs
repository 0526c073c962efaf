//! `layerboot`: the build-time half of layerboot (booster's generator, in spirit).
//! This file only parses the command line; the work is in the library (`lib.rs`).

use argh::FromArgs;
use layerboot::deploy::commands;
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
    Deploy(commands::DeployArgs),
    Upgrade(commands::UpgradeArgs),
    Status(commands::StatusArgs),
    Rollback(commands::RollbackArgs),
    Gc(commands::GcArgs),
    Bless(commands::BlessArgs),
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
        Some(Command::Deploy(args)) => commands::deploy(args),
        Some(Command::Upgrade(args)) => commands::upgrade(args),
        Some(Command::Status(args)) => commands::status(args),
        Some(Command::Rollback(args)) => commands::rollback(args),
        Some(Command::Gc(args)) => commands::gc(args),
        Some(Command::Bless(args)) => commands::bless(args),
        None => Err("no command given (try: layerboot --help)".into()),
    };
    if let Err(e) = result {
        eprintln!("layerboot: {e}");
        std::process::exit(1);
    }
}
