//! Running the daemon: build the layers from a `Config`, mount, wait for a signal or unmount.
