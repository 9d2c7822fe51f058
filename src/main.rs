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
/// maximum (info until the configuration file's `log_level` is read). Access lines are
/// printed bare, so JSON access logs stay one JSON object per line.
fn init_logging() {
    use std::io::Write;
    let mut builder = if std::env::var_os("RUST_LOG").is_some() {
        env_logger::Builder::from_env(env_logger::Env::default())
    } else {
        let mut b = env_logger::Builder::new();
        b.filter_level(log::LevelFilter::Trace);
        b
    };
    builder.format(|buf, record| {
        if record.target() == taskcluster_proxy::accesslog::TARGET {
            writeln!(buf, "{}", record.args())
        } else {
            let ts = buf.timestamp_seconds();
            writeln!(
                buf,
                "[{ts} {} {}] {}",
                record.level(),
                record.target(),
                record.args()
            )
        }
    });
    builder.init();
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
