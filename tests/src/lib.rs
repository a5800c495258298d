//! End-to-end tests that drive Cairn with real third-party clients (skopeo,
//! podman, containerd, oras, qemu-img, nbdcopy, promtool, …).
//!
//! Empty until the node daemon exists (issue 3/8). The chunk store's
//! binary-level tests, including the SIGKILL crash test, live next to the
//! binary in `cli/tests/`, where Cargo hands them the built `cairn`.
