//! `chatserver`: read the configuration, start logging, serve.

use chatconnect::config::Config;

fn main() {
    let cfg = Config::load();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Err(e) = chatconnect::serve(cfg) {
        log::error!("{e}");
        eprintln!("chatserver: {e}");
        std::process::exit(1);
    }
}
