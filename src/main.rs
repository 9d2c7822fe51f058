use clap::Parser;
use taskcluster_proxy::cli::Cli;

fn main() {
    let cli = Cli::parse();
    if cli.version {
        println!("{}", Cli::version_text());
        return;
    }
    if cli.short_version {
        println!("{}", taskcluster_proxy::VERSION);
        return;
    }
    init_logging();
    if let Err(e) = taskcluster_proxy::server::run(cli) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

/// `RUST_LOG` when set; otherwise everything reaches the logger and the level is a global
/// maximum (info until the configuration file's `log_level` is read).
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        env_logger::Builder::from_env(env_logger::Env::default()).init();
    } else {
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Trace)
            .init();
        log::set_max_level(log::LevelFilter::Info);
    }
}
