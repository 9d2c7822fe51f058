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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = taskcluster_proxy::server::run(cli) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
