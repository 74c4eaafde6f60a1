//! One resource monitor for the whole runtime: one sysinfo handle, one NVML handle, one
//! sampling thread at one interval. The memory governor, model admission, the
//! profiler and the trackers' metrics all read it, so they see the same figures and
//! NVML is opened once.
//!
//! Readings come two ways. The sampling thread (started with an interval) takes one
//! per tick, keeps it as [`ResourceMonitor::latest`] and hands it to every subscriber
//! (the profiler aggregates them, the governor acts on them). A caller that needs the
//! figures of this moment — admission before a load, the governor while it unloads —
//! takes [`ResourceMonitor::sample_now`] through the same handles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::{Device, MemoryInfo};

use crate::devices::{GpuDevice, read_gpus};
use crate::memory::{MemoryProbe, MemorySample};

/// Everything one sample saw.
#[derive(Debug, Clone)]
pub struct Reading {
    /// When it was taken.
    pub at: Instant,
    /// System memory, this process's RSS and CPU use.
    pub memory: MemorySample,
    /// Every NVIDIA GPU (NVML); empty without a driver.
    pub gpus: Vec<GpuDevice>,
}

impl Reading {
    /// Memory of each GPU, by NVML index (`cuda:N`).
    pub fn gpu_memory(&self) -> Vec<(usize, MemoryInfo)> {
        self.gpus
            .iter()
            .filter_map(|g| match g.device {
                Device::Cuda(n) => Some((n, g.memory)),
                _ => None,
            })
            .collect()
    }

    /// The highest used fraction of memory over the GPUs; 0 without any.
    pub fn gpu_used_fraction(&self) -> f64 {
        self.gpus
            .iter()
            .filter(|g| g.memory.total > 0)
            .map(|g| g.memory.used as f64 / g.memory.total as f64)
            .fold(0.0, f64::max)
    }

    /// The fuller of system memory and the fullest GPU, as a fraction.
    pub fn fullest_fraction(&self) -> f64 {
        self.memory.used_fraction().max(self.gpu_used_fraction())
    }

    /// Bytes available for new allocations on `device`, when known: the system's free
    /// memory for the CPU, NVML's free memory of GPU `N` for `cuda:N`.
    pub fn available(&self, device: Device) -> Option<u64> {
        match device {
            Device::Cpu => (self.memory.system.total > 0).then_some(self.memory.system.free),
            Device::Cuda(n) => self.gpu_memory().into_iter().find(|&(i, _)| i == n).map(|(_, m)| m.free),
            _ => None,
        }
    }
}

type Listener = Arc<dyn Fn(&Arc<Reading>) + Send + Sync>;

struct Shared {
    probe: Mutex<MemoryProbe>,
    latest: Mutex<Option<Arc<Reading>>>,
    listeners: Mutex<Vec<(u64, Listener)>>,
    next_listener: AtomicU64,
}

/// The runtime's one resource monitor. Cheap to share (`Arc`); the sampling thread
/// stops when the last `Arc` is dropped.
pub struct ResourceMonitor {
    shared: Arc<Shared>,
    interval: Option<Duration>,
    thread: Mutex<Option<(flume::Sender<()>, JoinHandle<()>)>>,
}

impl ResourceMonitor {
    /// A monitor with no sampling thread: readings only when asked for
    /// ([`sample_now`](Self::sample_now)); subscribers are never called.
    pub fn on_demand() -> Arc<Self> {
        Arc::new(Self::with_interval(None))
    }

    fn with_interval(interval: Option<Duration>) -> Self {
        ResourceMonitor {
            shared: Arc::new(Shared {
                probe: Mutex::new(MemoryProbe::with_cpu()),
                latest: Mutex::new(None),
                listeners: Mutex::new(Vec::new()),
                next_listener: AtomicU64::new(0),
            }),
            interval,
            thread: Mutex::new(None),
        }
    }

    /// A monitor whose thread takes a reading at once and then every `interval`,
    /// handing each to the subscribers.
    pub fn start(interval: Duration) -> Arc<Self> {
        let interval = interval.max(Duration::from_millis(1));
        let monitor = Arc::new(Self::with_interval(Some(interval)));
        let (stop, stopped) = flume::bounded::<()>(1);
        let weak: Weak<Shared> = Arc::downgrade(&monitor.shared);
        let thread = std::thread::Builder::new().name("kiln-monitor".into()).spawn(move || {
            loop {
                let Some(shared) = weak.upgrade() else { return };
                let reading = shared.sample();
                let listeners: Vec<Listener> =
                    lock(&shared.listeners).iter().map(|(_, l)| l.clone()).collect();
                drop(shared);
                for listener in listeners {
                    listener(&reading);
                }
                match stopped.recv_timeout(interval) {
                    Err(flume::RecvTimeoutError::Timeout) => continue,
                    _ => return, // stopped, or the monitor is gone
                }
            }
        });
        match thread {
            Ok(thread) => *lock(&monitor.thread) = Some((stop, thread)),
            Err(e) => tracing::warn!("cannot start the resource monitor's thread ({e}); no periodic samples"),
        }
        monitor
    }

    /// The sampling interval; `None` for an on-demand monitor.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Takes a reading now through the monitor's handles and keeps it as the latest.
    /// Subscribers are not called: they see the thread's readings, one per tick.
    pub fn sample_now(&self) -> Arc<Reading> {
        self.shared.sample()
    }

    /// The most recent reading, however it was taken; `None` before the first.
    pub fn latest(&self) -> Option<Arc<Reading>> {
        lock(&self.shared.latest).clone()
    }

    /// Calls `listener` with every reading the sampling thread takes, on that thread,
    /// until the returned [`Subscription`] is dropped. Keep listeners short: every
    /// subscriber waits for the ones before it.
    pub fn subscribe(&self, listener: impl Fn(&Arc<Reading>) + Send + Sync + 'static) -> Subscription {
        let id = self.shared.next_listener.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.listeners).push((id, Arc::new(listener)));
        Subscription { shared: Arc::downgrade(&self.shared), id }
    }

    /// Stops the sampling thread and waits for it; readings on demand still work.
    /// Idempotent.
    pub fn stop(&self) {
        if let Some((stop, thread)) = lock(&self.thread).take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl Drop for ResourceMonitor {
    fn drop(&mut self) {
        // The thread holds only a weak reference; dropping the sender wakes it to exit.
        if let Some((stop, _thread)) = lock(&self.thread).take() {
            drop(stop);
        }
    }
}

impl Shared {
    fn sample(&self) -> Arc<Reading> {
        let reading = {
            let mut probe = lock(&self.probe);
            let memory = probe.sample();
            let gpus = probe.nvml().map(read_gpus).unwrap_or_default();
            Arc::new(Reading { at: Instant::now(), memory, gpus })
        };
        *lock(&self.latest) = Some(reading.clone());
        reading
    }
}

/// A subscriber's registration; dropping it unsubscribes.
pub struct Subscription {
    shared: Weak<Shared>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.listeners).retain(|(id, _)| *id != self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber that counts its readings on a channel, so the test waits on
    /// events rather than polling.
    fn counting(monitor: &ResourceMonitor) -> (Subscription, flume::Receiver<()>) {
        let (tx, rx) = flume::unbounded();
        let subscription = monitor.subscribe(move |r| {
            assert!(r.memory.system.total > 0 && r.memory.process_rss > 0, "{r:?}");
            let _ = tx.send(());
        });
        (subscription, rx)
    }

    fn receive(rx: &flume::Receiver<()>, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..n {
            rx.recv_deadline(deadline)
                .unwrap_or_else(|_| panic!("{what}: {i} of {n} readings before the deadline"));
        }
    }

    #[test]
    fn subscribers_get_every_tick_until_they_unsubscribe() {
        let monitor = ResourceMonitor::start(Duration::from_millis(10));
        let (first, first_rx) = counting(&monitor);
        receive(&first_rx, 3, "first subscriber");
        drop(first);
        while first_rx.try_recv().is_ok() {}
        // Two readings of a subscriber added after the drop: at least one whole tick
        // ran after it. A tick already delivering at the drop may still land one.
        let (_second, second_rx) = counting(&monitor);
        receive(&second_rx, 2, "second subscriber");
        assert!(first_rx.len() <= 1, "a dropped subscription got {} more readings", first_rx.len());
        assert!(monitor.latest().is_some(), "the thread keeps its readings");
    }

    #[test]
    fn on_demand_readings_use_the_same_handles_and_become_the_latest() {
        let monitor = ResourceMonitor::on_demand();
        assert!(monitor.latest().is_none());
        let reading = monitor.sample_now();
        assert!(reading.available(Device::Cpu).is_some_and(|free| free > 0));
        assert!(Arc::ptr_eq(&reading, &monitor.latest().unwrap()));
        assert_eq!(reading.available(Device::Cuda(99)), None);
        monitor.stop(); // no thread: nothing to stop
    }
}
