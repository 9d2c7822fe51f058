#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use taskcluster_proxy::accesslog;
use taskcluster_proxy::cli::{Cli, Settings};

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
    let settings = match cli.settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    init_logging(&settings);
    if let Err(e) = taskcluster_proxy::server::run(cli, settings) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

/// `RUST_LOG` when set (full `env_logger` filter syntax); otherwise the configured level,
/// with access lines kept at info unless the access log is off, so turning the level down
/// does not silence it. Access lines are printed bare: JSON access logs stay one object per
/// line.
fn init_logging(settings: &Settings) {
    use std::io::Write;
    let mut builder = if std::env::var_os("RUST_LOG").is_some() {
        env_logger::Builder::from_env(env_logger::Env::default())
    } else {
        let mut b = env_logger::Builder::new();
        b.filter_level(
            settings
                .log_level
                .map_or(log::LevelFilter::Info, |l| l.filter()),
        );
        if settings.access_log != accesslog::Format::Off {
            b.filter_module(accesslog::TARGET, log::LevelFilter::Info);
        }
        b
    };
    // Pingora's debug and trace output dumps request and response headers and bodies, which
    // can carry bewits and credentials (e.g. an auth service response): never below info.
    let base = match std::env::var("RUST_LOG") {
        // The bare level in RUST_LOG (e.g. `warn` in `warn,my::module=debug`), if any.
        Ok(filters) => filters
            .split(',')
            .find_map(|f| f.trim().parse::<log::LevelFilter>().ok())
            .unwrap_or(log::LevelFilter::Info),
        Err(_) => settings
            .log_level
            .map_or(log::LevelFilter::Info, |l| l.filter()),
    };
    for module in [
        "pingora_proxy",
        "pingora_core",
        "pingora_http",
        "pingora_pool",
    ] {
        builder.filter_module(module, base.min(log::LevelFilter::Info));
    }
    builder.format(|buf, record| {
        if record.target() == accesslog::TARGET {
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
}
