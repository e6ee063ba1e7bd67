//! The seccomp filter every process-mode server runs under: a deny list of
//! the system calls a server never needs and an attacker wants (debugging
//! other processes, mounting, kernel modules and keyrings, BPF, new
//! namespaces), each answered `EPERM`. Built with `seccompiler`; the filter
//! also kills a process that uses another architecture's calling convention
//! (i386 `int 0x80`), and denies the x32 numbers of the same calls.
//!
//! Owns only the filter's content; the init applies it as the last layer.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The calls denied outright.
pub const DENIED: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("vhangup", libc::SYS_vhangup),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp is not supported on this architecture")]
    Arch,
    #[error("failed to build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("failed to install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
}

fn arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch)
}

/// The compiled filter, ready to install.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(x32_live())?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Whether this kernel runs x32 system calls. Most kernels have them off
/// (a boot-time setting); then every x32 number answers ENOSYS whatever a
/// filter says, and leaving their rules out halves the filter, which the
/// kernel emulates once per system call number when it is installed.
fn x32_live() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: getpid takes no arguments and has no effect.
        let r = unsafe { libc::syscall(X32_BIT | libc::SYS_getpid) };
        !(r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The rules of the main filter; `x32`: also the x32 numbers of the calls.
fn rules(x32: bool) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in DENIED {
        rules.insert(*nr, Vec::new());
        #[cfg(target_arch = "x86_64")]
        if x32 {
            rules.insert(*nr | X32_BIT, Vec::new());
        }
    }
    #[cfg(target_arch = "x86_64")]
    if x32 {
        for nr in X32_ONLY {
            rules.insert(*nr | X32_BIT, Vec::new());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x32;
    // clone with a namespace flag; clone3 hides its flags in memory, so a
    // second filter answers it ENOSYS and libc falls back to clone.
    let any_ns: Vec<SeccompRule> = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ]
    .into_iter()
    .map(|flag| {
        let flag = flag as u64;
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
    })
    .collect::<Result<_, _>>()
    .map_err(SeccompError::Build)?;
    rules.insert(libc::SYS_clone, any_ns);
    Ok(rules)
}

/// The filter answering ENOSYS to `clone3`.
pub fn clone3_program() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Installs the filters on the calling thread (no_new_privs must be set).
pub fn apply(main: &BpfProgram, clone3: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(clone3).map_err(SeccompError::Apply)?;
    seccompiler::apply_filter(main).map_err(SeccompError::Apply)
}

#[cfg(target_arch = "x86_64")]
const X32_BIT: i64 = 0x4000_0000;

/// x32 numbers of denied calls that differ from their x86_64 numbers.
#[cfg(target_arch = "x86_64")]
const X32_ONLY: &[i64] = &[
    521, // ptrace
    528, // kexec_load
    539, // process_vm_readv
    540, // process_vm_writev
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        let p = program().unwrap();
        assert!(!p.is_empty());
        assert!(!clone3_program().unwrap().is_empty());
        let names: Vec<&str> = DENIED.iter().map(|(n, _)| *n).collect();
        for must in [
            "ptrace",
            "mount",
            "umount2",
            "pivot_root",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "userfaultfd",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
            "swapoff",
        ] {
            assert!(names.contains(&must), "{must} is not denied");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_numbers_are_denied_where_the_kernel_runs_them() {
        let with = rules(true).unwrap();
        let without = rules(false).unwrap();
        for (name, nr) in DENIED {
            assert!(with.contains_key(nr) && without.contains_key(nr), "{name}");
            assert!(with.contains_key(&(nr | X32_BIT)), "x32 {name}");
            assert!(!without.contains_key(&(nr | X32_BIT)), "x32 {name}");
        }
        for nr in X32_ONLY {
            assert!(with.contains_key(&(nr | X32_BIT)));
        }
        assert!(without.contains_key(&libc::SYS_clone));
    }
}
