//! `tern-bench`: the load generator for `ternd`. It speaks the real protocol through a lean
//! client on `tern-proto` and starts its own `ternd` with a throwaway data directory (or uses a
//! running one). Pin the generator and the server to different cores, e.g.
//! `taskset -c 0 tern-bench --server-cpus 1 throughput ...`. See BENCHMARKS.md.

mod client;
mod report;
mod scenarios;
mod target;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tern-bench", version, about = "Load generator for ternd")]
struct Cli {
    #[command(flatten)]
    target: target::TargetArgs,
    /// One JSON line per run instead of a human summary.
    #[arg(long, global = true)]
    json: bool,
    /// Message body size in bytes (at least 16).
    #[arg(long, global = true, default_value_t = 64)]
    body: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N authenticated idle connections: connect rate and server memory per connection.
    Connect {
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// Sender/receiver pairs with a window of messages in flight: delivered messages per second.
    Throughput {
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Open loop at a fixed total rate: latency corrected for coordinated omission.
    Latency {
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Connect the receivers to this other node of the same cluster (http://host:port)
        /// instead of the server the senders use: latency across nodes.
        #[arg(long)]
        receivers_at: Option<String>,
    },
    /// One group, every member online: deliveries per second, time until the last member.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        members: usize,
        #[arg(long, default_value_t = 10)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// An offline device with M waiting messages connects: time to drain, order verified.
    Drain {
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
    },
    /// N offline devices registered for push, one message each at a fixed rate: the delay
    /// from message to push at a push service on 127.0.0.1, and the server's CPU time.
    Push {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Messages per second (one per device).
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Register no subscriptions: the same messages without pushes (a baseline).
        #[arg(long)]
        no_push: bool,
    },
    /// Upload and download one object: throughput both ways, server memory growth.
    Media {
        /// Object size in bytes (at most the server's media.max_object_bytes, 2 GiB).
        #[arg(long, default_value_t = 256 << 20)]
        size: u64,
        /// Bytes per tus PATCH request; 0 = the whole object in one request.
        #[arg(long, default_value_t = 0)]
        chunk: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let target = target::Target::start(&cli.target)?;
        let pid = target.pid(&cli.target);
        let body = cli.body.max(16);
        let (human, value) = match cli.scenario {
            Scenario::Connect { n, concurrency } => {
                scenarios::connect::run(&target, pid, n, concurrency).await?
            }
            Scenario::Throughput {
                pairs,
                window,
                seconds,
            } => scenarios::throughput::run(&target, pairs, window, seconds, body).await?,
            Scenario::Latency {
                rate,
                seconds,
                pairs,
                receivers_at,
            } => {
                let receivers = receivers_at.map(|url| target::address_of(&url));
                scenarios::latency::run(&target, receivers.as_deref(), rate, seconds, pairs, body)
                    .await?
            }
            Scenario::Fanout {
                members,
                rate,
                seconds,
            } => scenarios::fanout::run(&target, members, rate, seconds, body).await?,
            Scenario::Drain { messages } => scenarios::drain::run(&target, messages, body).await?,
            Scenario::Push {
                devices,
                rate,
                no_push,
            } => scenarios::push::run(&target, pid, devices, rate, no_push, body).await?,
            Scenario::Media { size, chunk } => {
                scenarios::media::run(&target, pid, size, chunk).await?
            }
        };
        let peak = pid.and_then(target::rss).map(|(_, hwm)| hwm);
        let mut value = value;
        value["server_peak_rss"] = serde_json::json!(peak);
        report::emit(cli.json, &human, value);
        Ok(())
    })
}
