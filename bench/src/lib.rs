//! What the benchmark drivers share: free loopback ports, a guard that stops a `sluice up` (and
//! with it its instances and Envoy) when a run ends, even on error, an open/closed-loop HTTP load
//! generator and pinned, measured child processes (the data-path bench).

pub mod loadgen;
pub mod process;

use std::process::Child;
use std::time::{Duration, Instant};

/// A port free on loopback now (the driver hands it to `sluice up` right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Stops the process on drop: SIGTERM, so that `sluice up` stops its instances and Envoy, then
/// SIGKILL if it has not exited within `grace`.
pub struct SluiceGuard {
    pub child: Child,
    pub grace: Duration,
}

impl Drop for SluiceGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// KIngress `bench/ing-<i>` for host `svc-<i>.bench.localhost` and `extra_hosts`, routed to Service
/// `bench/upstream` port 80: what the propagation drivers load and change.
pub fn ingress_yaml(i: usize, extra_hosts: &[String]) -> String {
    let mut hosts = format!("    - svc-{i}.bench.localhost\n");
    for h in extra_hosts {
        hosts.push_str(&format!("    - {h}\n"));
    }
    format!(
        "apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: ing-{i}
  namespace: bench
  annotations:
    networking.knative.dev/ingress.class: sluice.ingress.networking.knative.dev
spec:
  rules:
  - hosts:
{hosts}    visibility: ExternalIP
    http:
      paths:
      - splits:
        - serviceName: upstream
          serviceNamespace: bench
          servicePort: 80
          percent: 100
"
    )
}
