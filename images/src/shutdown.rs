//! SIGTERM and SIGINT for the long-running commands (`hb mount`, `hb daemon`, `hb proxy`).
//!
//! Caught from the command's first step ([`Shutdown::install`]), so the process never dies by the
//! signal with something half made. Until the command says how it stops, a signal ends the process
//! at once (exit 128 + signal: a pull in progress is left as a kill would leave it, which the store
//! survives), except while a step that makes something visible runs ([`Shutdown::starting`]: the
//! mount syscall and the registration of its unmount happen under one lock the signal waits for).
//! From then on a signal runs the command's stop action once (an unmount, a server's shutdown).

use std::future::Future;
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

type Action = Box<dyn FnOnce(i32) + Send>;

enum Phase {
    /// Nothing to undo yet: a signal exits.
    Starting,
    /// A signal runs this.
    Stop(Action),
    /// The stop action ran; later signals are ignored.
    Stopping,
}

/// The signals of a long-running command, caught from [`Shutdown::install`] on.
pub struct Shutdown {
    phase: Arc<Mutex<Phase>>,
}

impl Shutdown {
    /// Starts catching SIGTERM and SIGINT, on a thread of their own.
    pub fn install() -> std::io::Result<Self> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let phase = Arc::new(Mutex::new(Phase::Starting));
        let shared = phase.clone();
        std::thread::Builder::new().name("hb-signals".into()).spawn(move || {
            for sig in signals.forever() {
                let mut p = shared.lock().expect("shutdown lock");
                match std::mem::replace(&mut *p, Phase::Stopping) {
                    Phase::Starting => {
                        tracing::info!(signal = sig, "signal received while starting; exiting");
                        // `_exit`, as a kill would: `exit` runs C++ static destructors (RocksDB's)
                        // while other threads may be inside the store, which crashed the process
                        // (SIGSEGV, or an abort on a foreign exception) instead of exiting.
                        signal_hook::low_level::exit(128 + sig);
                    }
                    Phase::Stop(action) => {
                        drop(p);
                        tracing::info!(signal = sig, "signal received; stopping");
                        action(sig);
                    }
                    Phase::Stopping => tracing::debug!(signal = sig, "signal received while stopping; ignored"),
                }
            }
        })?;
        Ok(Shutdown { phase })
    }

    /// Runs `start` with signals held off, and on success makes `stop(&result)` the action of
    /// the next signal (a signal that came meanwhile runs it as soon as `start` returns).
    pub fn starting<T, E>(
        &self,
        start: impl FnOnce() -> Result<T, E>,
        stop: impl FnOnce(&T) -> Action,
    ) -> Result<T, E> {
        let mut p = self.phase.lock().expect("shutdown lock");
        let made = start()?;
        if matches!(*p, Phase::Starting) {
            *p = Phase::Stop(stop(&made));
        }
        Ok(made)
    }

    /// Makes `f` the action of the next signal (from now on a signal no longer exits).
    pub fn on_signal(&self, f: impl FnOnce(i32) + Send + 'static) {
        let mut p = self.phase.lock().expect("shutdown lock");
        if matches!(*p, Phase::Starting) {
            *p = Phase::Stop(Box::new(f));
        }
    }

    /// A future that is ready at the next signal (for a server's `select!`).
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.on_signal(move |_| {
            let _ = tx.send(());
        });
        async move {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_during_a_start_waits_for_it_then_runs_the_stop_action() {
        let s = Shutdown::install().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let made = s.starting(
            || {
                // Delivered now: with no handler this would end the test process, and with one
                // that did not wait, the stop action would not be there yet.
                signal_hook::low_level::raise(SIGINT).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
                Ok::<_, ()>("mounted")
            },
            |m| {
                let m = m.to_string();
                Box::new(move |sig| tx.send((m, sig)).unwrap())
            },
        );
        assert_eq!(made, Ok("mounted"));
        let got = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(got, ("mounted".to_string(), SIGINT));
    }
}
