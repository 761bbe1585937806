//! keygate against nginx doing the same job, and against the bare upstream, in one run.
//!
//! Starts, on loopback:
//! - the bare upstream: nginx, one worker, `return 200`;
//! - nginx as keygate: one worker, a `map` of the same valid keys (401 for any other), two
//!   `limit_req` zones keyed by the key (per minute and per second, high enough that nothing is
//!   refused), the key header stripped, `X-Forwarded-*` and the key id added, keep-alive to the
//!   upstream, an access log line per request;
//! - keygate, `workers: 1`, on the embedded store holding the same keys, its access log on;
//! - with `--big N`, a second keygate whose store holds N keys, all in use;
//! - hyper alone: this bench's own process, re-run as the least a proxy built on hyper does
//!   (hyper's HTTP/1 server, each client connection given its own upstream connection through
//!   hyper's HTTP/1 client, no key, no limit, no log, one thread): the ceiling of a gateway
//!   built on hyper's server and client, measured in the same run. keygate sends requests
//!   without a body through its own exchange instead of hyper's client (`upstream::lean`).
//!
//! Each target is driven by wrk (`benches/rotate_keys.lua`: every request the next key, so all
//! are in use) with fixed connections; runs of all targets are interleaved, so drift hits all
//! alike. Processes are pinned: wrk alone on CPU 0; the target and the upstream on CPU 1.
//! Prints requests/s, p50, p99, the CPU time per request of the target and of the upstream
//! (median of the runs), each target's ratio to the bare upstream, keygate's to nginx and to
//! hyper alone (per run, then the median), in how many runs keygate's requests/s and p99 were
//! at least as good as nginx's, a warning when the hypervisor took CPU 1 during runs, and
//! keygate's memory.
//!
//! The host's speed drifts here from run to run by more than the differences measured, and
//! requests/s and CPU time follow it. A target's CPU over the upstream's in the same run
//! cancels most of it: the steadiest figure to compare a build with another that drives the
//! upstream alike, within 2% from run to run of one invocation (it still moved by 5% between
//! two hours of the same day: builds are compared in invocations run back to back). Between
//! targets, and builds that differ there, it also carries how
//! each drives the upstream: keygate writes the heads of requests that arrived together at
//! once, in one system call where it can (`upstream::uring`), which moves work between it and
//! the upstream. CPU 1's busy time per request counts all that the shared core did for a
//! request (both processes, and network work charged to neither): requests/s follows it
//! while the core is the limit. It follows the host's speed too. On a VM the hypervisor also
//! takes CPU 1 from the guest at times, for other guests (steal, printed per run): a target
//! serves nothing meanwhile, and its requests/s falls by that share, while CPU 1's busy time
//! per request leaves it out.
//!
//! Run: `cargo bench --bench load` (options after `--`: `--runs 5 --seconds 10
//! --connections 64 --keys 1000 --big 1000000`). Installs nginx and wrk with apt-get when
//! missing.

mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keygate::bench;
#[global_allocator]
static ALLOCATOR: keygate_alloc::MiMalloc = keygate_alloc::MiMalloc; // as keygate's, for hyper alone
use keygate::store::SqliteStore;
use support::{
    Killed, core_seconds, free_port, memory_mib, process_tree, tree_cpu_seconds, wait_for_port,
};

const TOKEN: &str = "bench-admin-token-0123456789";
const MISSES: &str = "keygate_key_cache_lookups_total{result=\"miss\"}";
const WRK_SCRIPT: &str = include_str!("rotate_keys.lua");
const HYPER_ALONE: &str = "hyper alone (no key, no log)";
/// wrk runs alone on this CPU; each target and the upstream share the other.
const WRK_CPU: usize = 0;
const SHARED_CPU: usize = 1;
/// A run whose steal is over this share of CPU 1 is counted in the warning under the table.
const STEAL_NOTED: f64 = 0.02;

struct Options {
    runs: usize,
    seconds: u64,
    connections: usize,
    keys: usize,
    big: Option<usize>,
    /// Only the targets whose name contains this (for profiling one of them).
    only: Option<String>,
}

fn options() -> Options {
    let mut o = Options {
        runs: 5,
        seconds: 10,
        connections: 64,
        keys: 1000,
        big: None,
        only: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("{arg} takes a number"))
        };
        match arg.as_str() {
            "--runs" => o.runs = value(),
            "--seconds" => o.seconds = value() as u64,
            "--connections" => o.connections = value(),
            "--keys" => o.keys = value(),
            "--big" => o.big = Some(value()),
            "--only" => o.only = it.next().cloned(),
            _ => {} // `--bench`, added by cargo
        }
    }
    o
}

/// Installs what the bench drives with, as `scripts/test` does for the tests.
fn ensure_tools() {
    let missing: Vec<&str> = [("nginx", "nginx"), ("wrk", "wrk")]
        .into_iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return;
    }
    eprintln!("installing {}", missing.join(" "));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n");
    let sudo = if root.unwrap_or(false) {
        vec![]
    } else {
        vec!["sudo"]
    };
    let apt = |args: &[&str]| {
        Command::new(sudo.first().copied().unwrap_or("apt-get"))
            .args(sudo.first().map(|_| "apt-get"))
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = apt(&["update", "-qq"]);
    assert!(
        apt(&[&["install", "-y", "-qq"][..], &missing].concat()),
        "could not install {missing:?}: install them and run again"
    );
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|p| p.join(bin).is_file() || Path::new("/usr/sbin").join(bin).is_file())
    })
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}

/// `taskset -c <cpu>` when the machine has that CPU, else nothing (figures then less stable).
fn pinned(cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 && on_path("taskset") {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpu.to_string()).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The lines every nginx config here starts with: one worker, everything under `dir`.
fn nginx_head(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  client_body_temp_path {d}/{name}-body;\n  proxy_temp_path {d}/{name}-proxy;\n\
         fastcgi_temp_path {d}/{name}-fcgi;\n  uwsgi_temp_path {d}/{name}-uwsgi;\n  scgi_temp_path {d}/{name}-scgi;\n"
    )
}

fn start_nginx(dir: &Path, name: &str, config: &str, port: u16) -> Killed {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, config).unwrap();
    let child = pinned(SHARED_CPU, nginx_binary())
        .args(["-e", "stderr", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("nginx");
    let process = Killed(child);
    wait_for_port(port, name, Duration::from_secs(30));
    process
}

fn upstream_config(dir: &Path, port: u16) -> String {
    nginx_head(dir, "upstream")
        + &format!(
            "  access_log off;\n  keepalive_requests 1000000;\n\
             server {{ listen 127.0.0.1:{port} reuseport backlog=4096; location / {{ return 200 \"ok\"; }} }}\n}}\n"
        )
}

/// nginx doing keygate's job as closely as nginx can.
fn proxy_config(dir: &Path, port: u16, upstream: u16, keys: &Path, key_count: usize) -> String {
    let d = dir.display();
    // Room for every key's limit state: about 128 bytes a key and window.
    let zone_mib = (key_count * 128 / (1 << 20)).max(1) * 2;
    nginx_head(dir, "proxy")
        + &format!(
            "  access_log {d}/proxy.access.log combined buffer=32k flush=100ms;\n  keepalive_requests 1000000;\n\
  map_hash_max_size {hash};\n  map_hash_bucket_size 128;\n\
  map $http_x_api_key $key_id {{\n    default \"\";\n    include {keys};\n  }}\n\
  limit_req_zone $http_x_api_key zone=per_minute:{zone_mib}m rate=1000000000r/m;\n\
  limit_req_zone $http_x_api_key zone=per_second:{zone_mib}m rate=1000000r/s;\n\
  upstream api {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
  server {{\n    listen 127.0.0.1:{port} reuseport backlog=4096;\n\
    location / {{\n      if ($key_id = \"\") {{ return 401; }}\n\
      limit_req zone=per_minute burst=1000000 nodelay;\n\
      limit_req zone=per_second burst=1000000 nodelay;\n\
      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
      proxy_set_header X-API-Key \"\";\n      proxy_set_header X-Forwarded-For $remote_addr;\n\
      proxy_set_header X-Forwarded-Proto $scheme;\n      proxy_set_header X-Forwarded-Host $host;\n\
      proxy_set_header X-Keygate-Key-Id $key_id;\n      proxy_pass http://api;\n    }}\n  }}\n}}\n",
            keys = keys.display(),
            hash = (key_count * 4).max(4096),
        )
}

/// A keygate with one worker on an embedded store of `count` fresh keys; the file of their
/// secrets for wrk, and the nginx `map` lines of the same keys.
struct Keygate {
    process: Killed,
    port: u16,
    admin: u16,
    secrets: PathBuf,
    map: PathBuf,
}

fn start_keygate(dir: &Path, name: &str, count: usize, upstream: u16) -> Keygate {
    let started = std::time::Instant::now();
    let keys = bench::keys(count, "kg_");
    let store = dir.join(format!("{name}.db"));
    bench::import(&SqliteStore::open(&store).unwrap(), &keys);
    let (mut secrets, mut map) = (String::new(), String::new());
    for (secret, record) in &keys {
        writeln!(secrets, "{secret}").unwrap();
        writeln!(map, "\"{secret}\" \"{}\";", record.id).unwrap();
    }
    drop(keys);
    let secrets_path = dir.join(format!("{name}.keys"));
    let map_path = dir.join(format!("{name}.map"));
    std::fs::write(&secrets_path, secrets).unwrap();
    std::fs::write(&map_path, map).unwrap();
    eprintln!("{name}: {count} keys written in {:.1?}", started.elapsed());

    let (port, admin) = (free_port(), free_port());
    let config = dir.join(format!("{name}.yaml"));
    // A cache ttl past the bench's length: keys are verified once, as in a steady state where
    // each key comes back within its ttl. Limits far above the load: nothing is refused.
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nworkers: 1\nadmin: {{listen: '127.0.0.1:{admin}', token: {TOKEN}}}\n\
             store: {{backend: embedded, path: '{}'}}\ncache: {{ttl: 1h}}\n\
             rate_limit: {{per_minute: 1000000000, per_second: 1000000}}\n\
             limits: {{failed_auth_per_minute_per_ip: 0}}\n\
             routes: [{{name: api, path_prefix: /, upstream: 'http://127.0.0.1:{upstream}'}}]\n",
            store.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = pinned(SHARED_CPU, env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "-c"])
        .arg(&config)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let process = Killed(child);
    wait_for_port(port, name, Duration::from_secs(30));
    Keygate {
        process,
        port,
        admin,
        secrets: secrets_path,
        map: map_path,
    }
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    /// CPU time of the target (all its processes and threads) per request.
    cpu_us: f64,
    /// CPU time of the upstream per request in the same run. Both follow the host's speed,
    /// which drifts from run to run here by more than the differences measured: a target's
    /// CPU over the upstream's is steadier than either (see the top of this file).
    upstream_us: f64,
    /// Busy time of CPU 1, which the target and the upstream share, per request: both
    /// processes, and the kernel's network work charged to neither.
    core_us: f64,
    /// The share of CPU 1's time the hypervisor gave to other guests during the run: while
    /// it does, neither the target nor the upstream runs, and requests/s falls with it.
    steal: f64,
}

/// One wrk run against `t`, the CPU time of `t` and of the upstream (process `upstream`)
/// counted over it.
fn wrk(t: &mut Target, upstream: u32, script: &Path, seconds: u64, connections: usize) -> Run {
    let (cpu, upstream_cpu) = (tree_cpu_seconds(t.pid), tree_cpu_seconds(upstream));
    let core = core_seconds(SHARED_CPU);
    let output = pinned(WRK_CPU, "wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .arg("-s")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}/bench", t.port))
        .env("KEYS_FILE", &t.keys)
        .env("KEYS_START", t.next_key.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("wrk printed no result:\n{text}"))
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    let requests = fields[0];
    t.next_key += requests as u64;
    let core_after = core_seconds(SHARED_CPU);
    Run {
        per_second: requests / (fields[1] / 1e6),
        p50_ms: fields[2] / 1e3,
        p99_ms: fields[3] / 1e3,
        failed: (fields[4] + fields[5]) as u64,
        cpu_us: (tree_cpu_seconds(t.pid) - cpu) * 1e6 / requests,
        upstream_us: (tree_cpu_seconds(upstream) - upstream_cpu) * 1e6 / requests,
        core_us: (core_after.busy - core.busy) * 1e6 / requests,
        steal: (core_after.steal - core.steal) / (core_after.all - core.all).max(f64::EPSILON),
    }
}

/// Sends `signal` (`-STOP`, `-CONT`) to a process and its descendants: an nginx master and
/// its worker.
fn signal_tree(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(signal)
        .args(process_tree(pid).iter().map(u32::to_string))
        .status();
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// A counter of keygate's `/metrics`, summed over its label sets.
fn metric(admin: u16, name: &str) -> f64 {
    let output = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://127.0.0.1:{admin}/metrics"))
        .output();
    let text = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Target {
    name: String,
    port: u16,
    keys: PathBuf,
    pid: u32,
    runs: Vec<Run>,
    /// Where the next run starts in the key file: each run goes on where the last stopped.
    next_key: u64,
}

impl Target {
    fn new(name: String, port: u16, keys: &Path, pid: u32) -> Target {
        Target {
            name,
            port,
            keys: keys.to_path_buf(),
            pid,
            runs: Vec::new(),
            next_key: 0,
        }
    }
}

/// `--hyper-alone <port> <upstream port>`: the bench's own process serving as hyper alone
/// (see the top of this file), pinned by the bench like the other targets. Never returns.
fn hyper_alone(port: u16, upstream: u16) -> ! {
    use hyper::server::conn::http1 as server;
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let upstream = TcpStream::connect(("127.0.0.1", upstream)).await?;
                client.set_nodelay(true)?;
                upstream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
                tokio::spawn(connection);
                // One request at a time on an HTTP/1 connection: the lock is never contended,
                // and it is not held while the response is awaited.
                let sender = std::sync::Arc::new(std::sync::Mutex::new(sender));
                let service =
                    hyper::service::service_fn(move |req| sender.lock().unwrap().send_request(req));
                server::Builder::new()
                    .serve_connection(TokioIo::new(client), service)
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
    })
}

fn start_hyper_alone(upstream: u16) -> (Killed, u16) {
    let port = free_port();
    let child = pinned(SHARED_CPU, std::env::current_exe().unwrap())
        .args(["--hyper-alone", &port.to_string(), &upstream.to_string()])
        .spawn()
        .unwrap();
    let process = Killed(child);
    wait_for_port(port, "hyper alone", Duration::from_secs(30));
    (process, port)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, port, upstream, ..] = &args[..]
        && flag == "--hyper-alone"
    {
        hyper_alone(port.parse().unwrap(), upstream.parse().unwrap());
    }
    let o = options();
    ensure_tools();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = d.join("rotate_keys.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();

    let upstream_port = free_port();
    let upstream = start_nginx(
        d,
        "upstream",
        &upstream_config(d, upstream_port),
        upstream_port,
    );
    let keygate = start_keygate(d, "keygate", o.keys, upstream_port);
    let proxy_port = free_port();
    let proxy = start_nginx(
        d,
        "proxy",
        &proxy_config(d, proxy_port, upstream_port, &keygate.map, o.keys),
        proxy_port,
    );
    let big = o
        .big
        .map(|n| (n, start_keygate(d, "keygate-big", n, upstream_port)));

    let mut targets = vec![
        Target::new(
            "bare upstream (nginx return 200)".into(),
            upstream_port,
            &keygate.secrets,
            upstream.0.id(),
        ),
        Target::new(
            format!("nginx doing the job, {} keys", o.keys),
            proxy_port,
            &keygate.secrets,
            proxy.0.id(),
        ),
        Target::new(
            format!("keygate, {} keys", o.keys),
            keygate.port,
            &keygate.secrets,
            keygate.process.0.id(),
        ),
    ];
    let alone = start_hyper_alone(upstream_port);
    targets.push(Target::new(
        HYPER_ALONE.into(),
        alone.1,
        &keygate.secrets,
        alone.0.0.id(),
    ));
    if let Some((n, big)) = &big {
        targets.push(Target::new(
            format!("keygate, {n} keys"),
            big.port,
            &big.secrets,
            big.process.0.id(),
        ));
    }

    // Warm-up: every key once through each keygate (so each is cached, as in a steady state),
    // and a few seconds of each target.
    for (admin, count) in
        std::iter::once((keygate.admin, o.keys)).chain(big.iter().map(|(n, k)| (k.admin, *n)))
    {
        let target = targets
            .iter_mut()
            .find(|t| t.name.ends_with(&format!("keygate, {count} keys")))
            .unwrap();
        while metric(admin, MISSES) < count as f64 {
            wrk(target, upstream.0.id(), &script, 2, o.connections);
        }
    }
    if let Some(only) = &o.only {
        targets.retain(|t| t.name.contains(only.as_str()));
    }
    for t in &mut targets {
        wrk(t, upstream.0.id(), &script, 2, o.connections);
    }
    let misses_before = metric(keygate.admin, MISSES);

    println!(
        "wrk -t1 -c{} -d{}s, {} runs per target, interleaved; wrk on CPU 0, target and upstream on CPU 1",
        o.connections, o.seconds, o.runs
    );
    // Only the target being measured runs: the others are stopped, so what one does in the
    // background (the 1M-key keygate's sweeps and usage-log compactions, one of them due right
    // after its warm-up) is counted against itself, not against whichever target shares CPU 1
    // with it at the time. The bare upstream serves them all and always runs.
    let always = upstream.0.id();
    // `Some(i)`: target `i` runs, the others are stopped; `None`: all run again.
    let run_only = |targets: &[Target], measured: Option<usize>| {
        for (i, t) in targets.iter().enumerate().filter(|(_, t)| t.pid != always) {
            let runs = measured.is_none_or(|m| m == i);
            signal_tree(t.pid, if runs { "-CONT" } else { "-STOP" });
        }
    };
    for run in 1..=o.runs {
        for i in 0..targets.len() {
            run_only(&targets, Some(i));
            let t = &mut targets[i];
            let r = wrk(t, always, &script, o.seconds, o.connections);
            println!(
                "  run {run}  {:<36} {:>9.0} req/s  p50 {:>5.2} ms  p99 {:>5.2} ms  CPU {:>5.1} µs/req (upstream {:>4.1}, CPU 1 {:>4.1})  steal {:>4.1}%{}",
                t.name,
                r.per_second,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us,
                r.upstream_us,
                r.core_us,
                r.steal * 100.0,
                if r.failed > 0 {
                    format!("  FAILED {}", r.failed)
                } else {
                    String::new()
                }
            );
            t.runs.push(r);
        }
    }
    run_only(&targets, None);

    if o.only.is_some() {
        return;
    }
    let column = |t: &Target, f: fn(&Run) -> f64| median(t.runs.iter().map(f).collect());
    let bare = column(&targets[0], |r| r.per_second);
    println!(
        "\n| target | requests/s | p50 ms | p99 ms | × bare upstream | CPU µs/request | upstream's | CPU ÷ upstream's | CPU 1 µs/request | steal | failed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for t in &targets {
        let rps = column(t, |r| r.per_second);
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1}% | {} |",
            t.name,
            rps,
            column(t, |r| r.p50_ms),
            column(t, |r| r.p99_ms),
            rps / bare,
            column(t, |r| r.cpu_us),
            column(t, |r| r.upstream_us),
            column(t, |r| r.cpu_us / r.upstream_us),
            column(t, |r| r.core_us),
            column(t, |r| r.steal * 100.0),
            t.runs.iter().map(|r| r.failed).sum::<u64>()
        );
    }
    let ratio = |a: &Target, b: &Target, f: fn(&Run) -> f64| {
        median(
            a.runs
                .iter()
                .zip(&b.runs)
                .map(|(x, y)| f(x) / f(y))
                .collect(),
        )
    };
    let (nginx, ours) = (&targets[1], &targets[2]);
    println!(
        "\nkeygate / nginx, median of the per-run ratios: requests/s {:.2}x, p50 {:.2}x, p99 {:.2}x, CPU per request {:.2}x, CPU 1 per request {:.2}x",
        ratio(ours, nginx, |r| r.per_second),
        ratio(ours, nginx, |r| r.p50_ms),
        ratio(ours, nginx, |r| r.p99_ms),
        ratio(ours, nginx, |r| r.cpu_us),
        ratio(ours, nginx, |r| r.core_us),
    );
    // The medians hide how often a run went the other way; on a drifting host that is the
    // figure telling a margin from noise.
    let runs_where = |keep: fn(&Run, &Run) -> bool| {
        ours.runs
            .iter()
            .zip(&nginx.runs)
            .filter(|(x, y)| keep(x, y))
            .count()
    };
    println!(
        "  run by run: requests/s at least nginx's in {} of {runs}, p99 at most nginx's in {} of {runs}",
        runs_where(|x, y| x.per_second >= y.per_second),
        runs_where(|x, y| x.p99_ms <= y.p99_ms),
        runs = ours.runs.len(),
    );
    if let Some(alone) = targets.iter().find(|t| t.name == HYPER_ALONE) {
        println!(
            "hyper alone / nginx: requests/s {:.2}x, p99 {:.2}x; keygate / hyper alone: requests/s {:.2}x",
            ratio(alone, nginx, |r| r.per_second),
            ratio(alone, nginx, |r| r.p99_ms),
            ratio(ours, alone, |r| r.per_second),
        );
    }
    let all: Vec<&Run> = targets.iter().flat_map(|t| &t.runs).collect();
    let stolen = all.iter().filter(|r| r.steal > STEAL_NOTED).count();
    if stolen > 0 {
        println!(
            "steal over {:.0}% of CPU 1 in {stolen} of {} runs: the hypervisor gave the core to other \
             guests meanwhile, so those runs measure their load as much as the targets'; with \
             many, run again at a quieter hour",
            STEAL_NOTED * 100.0,
            all.len()
        );
    }
    let misses = metric(keygate.admin, MISSES) - misses_before;
    println!("keygate cache misses during the measured runs: {misses}");
    for t in targets[2..].iter().filter(|t| t.name != HYPER_ALONE) {
        println!(
            "{}: RSS {:.0} MiB, peak {:.0} MiB",
            t.name,
            memory_mib(t.pid, "VmRSS"),
            memory_mib(t.pid, "VmHWM")
        );
    }
    if let Some(big) = targets.iter().skip(3).find(|t| t.name != HYPER_ALONE) {
        let (small, n) = (&targets[2], o.big.unwrap_or(1));
        println!(
            "{n} keys vs {} keys: requests/s {:.2}x, p99 {:.2}x; memory per key {:.0} bytes",
            o.keys,
            ratio(big, small, |r| r.per_second),
            ratio(big, small, |r| r.p99_ms),
            (memory_mib(big.pid, "VmRSS") - memory_mib(small.pid, "VmRSS")) * 1048576.0
                / (n - o.keys) as f64
        );
    }
}
