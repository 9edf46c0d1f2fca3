//! `llama-tpu doctor`: checks a BM1684X box (or the simulator) for what the vendor's FAQ
//! blames for most failures: the runtime's and the driver's versions, the device nodes and
//! who may open them, the bmodel's compiler and chip, device memory against the bmodel's
//! need, the tokenizer against the bmodel's vocabulary, and one short run. Every finding is
//! one line: `ok`, `note` (informational) or `problem` with what to do; any problem makes
//! the exit code 1.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use super::{CliError, Exit, ModelArgs};
use crate::backend::sophon::ffi::{self, Runtime, StatAnswer, MIN_LIBSOPHON};
use crate::backend::{Backend, Next};
use crate::engine::load::{open_sophon, LoadFailure};
use crate::tokenizer::Tokenizer;

/// Arguments of `doctor`.
#[derive(Debug, Args)]
#[command(
    after_help = "Each line is `ok`, `note` (informational) or `problem` (with what to do). Exit code: 0 when \
no line says `problem`, 1 when one does, 2 on a bad command line. It checks the sophon backend whatever --backend says; \
the vendor runtime's own messages may appear between the lines."
)]
pub struct DoctorArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The service user whose access to the device nodes is checked (default: the current user).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Where the device nodes are looked for.
    #[arg(long, value_name = "DIR", default_value = "/dev")]
    dev_dir: PathBuf,
    /// Where the kernel's files are read (bmsophon/driver_version, sys/kernel/version).
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    proc_dir: PathBuf,
    /// Check the device nodes even when the runtime is the simulator (which opens none).
    #[arg(long)]
    expect_nodes: bool,
}

/// Test hook: a free device memory figure in MiB that replaces a larger one reported by the
/// device (or none, on the simulator, which reports 0 for everything). It only ever lowers
/// the figure, so it cannot make a box that is short of memory look fine.
const FREE_MIB_HOOK: &str = "LLAMA_TPU_DOCTOR_FREE_MIB";

/// The prompt of the short run.
const RUN_PROMPT: &str = "Hello";
/// Tokens decoded in the short run.
const RUN_TOKENS: usize = 8;

/// The findings so far, printed as they come (a crash in the vendor runtime leaves the lines
/// before it).
#[derive(Default)]
struct Report {
    problems: usize,
}

impl Report {
    fn line(&mut self, state: &str, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{state:<8}{text}");
        let _ = out.flush();
    }

    fn ok(&mut self, what: impl AsRef<str>) {
        self.line("ok", what.as_ref());
    }

    fn note(&mut self, what: impl AsRef<str>) {
        self.line("note", what.as_ref());
    }

    fn problem(&mut self, what: impl AsRef<str>, todo: impl AsRef<str>) {
        self.problems += 1;
        self.line("problem", &format!("{}: {}", what.as_ref(), todo.as_ref()));
    }

    fn skipped(&mut self, what: &str, why: &str) {
        self.note(format!("skipped {what}: {why}"));
    }
}

pub(super) fn doctor(a: &DoctorArgs) -> Result<(), CliError> {
    let mut r = Report::default();
    check(a, &mut r);
    if r.problems == 0 {
        Ok(())
    } else {
        Err(CliError::new(
            Exit::Failure,
            format!(
                "doctor: {} problem{} found",
                r.problems,
                if r.problems == 1 { "" } else { "s" }
            ),
        ))
    }
}

const LATER: &str = "the driver, the device nodes, device memory, the bmodel, the tokenizer and a run";

fn check(a: &DoctorArgs, r: &mut Report) {
    // 1. The runtime libraries.
    let Some(rt) = check_runtime(a, r) else {
        r.skipped(LATER, "they need the runtime");
        return;
    };
    let simulator = rt.dir.as_ref().is_some_and(|d| d.join("libcmodel.so").exists());
    let devices = if a.model.devices.is_empty() {
        vec![0]
    } else {
        a.model.devices.clone()
    };
    // 2. The driver.
    check_driver(a, simulator, r);
    // 3. The device nodes.
    let nodes_ok = check_nodes(a, &devices, simulator, r);
    // 4. The bmodel's header.
    let header = check_header(&a.model.model, r);
    let tokenizer = a.model.tokenizer.as_deref().map(Tokenizer::from_file);
    if !nodes_ok && !simulator {
        r.skipped(
            "device memory, the bmodel on the device and a run",
            "no usable device node",
        );
        check_tokenizer(a, tokenizer.as_ref(), None, r);
        return;
    }
    let Some(file_bytes) = header else {
        r.skipped(
            "device memory, the bmodel on the device and a run",
            "the bmodel is unreadable",
        );
        check_tokenizer(a, tokenizer.as_ref(), None, r);
        return;
    };
    // 5. Device memory, before the bmodel is loaded.
    let free = check_memory(&rt, &devices, file_bytes, r);
    drop(rt);
    if free
        .iter()
        .flatten()
        .any(|&f| f < mib(file_bytes / devices.len().max(1) as u64))
    {
        r.skipped(
            "loading the bmodel and a run",
            "the bmodel does not fit the free device memory",
        );
        check_tokenizer(a, tokenizer.as_ref(), None, r);
        return;
    }
    // 4 (continued). The bmodel through the backend: the contract.
    let hint = tokenizer
        .as_ref()
        .and_then(|t| t.as_ref().ok())
        .map(Tokenizer::vocab_size);
    let mut backend = match open_sophon(&a.model.settings(), hint) {
        Ok(b) => b,
        Err(e) => {
            let todo = if e.message.contains("bm_malloc_device_byte") {
                format!("too little device memory: {}", MEMORY_TODO)
            } else if e.failure == LoadFailure::BadModel {
                "a bmodel outside the Llama contract: see docs/tpu.md, Which bmodels run (compile it with \
                 tpu-mlir's llm_convert.py)"
                    .to_string()
            } else {
                "the device could not be opened: see the lines above".to_string()
            };
            r.problem(format!("the bmodel on the device: {}", e.message), todo);
            r.skipped("the tokenizer against the bmodel and a run", "the bmodel did not load");
            return;
        }
    };
    let info = backend.info().clone();
    r.ok(format!(
        "the bmodel loads on devices {devices:?}: {}, context {} tokens, {}",
        info.model, info.context_length, info.dtype
    ));
    let per_device = (info.weight_bytes + info.kv_cache_bytes) / devices.len().max(1) as u64;
    let takes = format!(
        "device memory: the bmodel takes about {} per device (weights {} + KV cache {}, all devices)",
        size_text(per_device),
        size_text(info.weight_bytes),
        size_text(info.kv_cache_bytes),
    );
    match free.iter().flatten().min() {
        Some(&f) if f < mib(per_device) => r.problem(format!("{takes}, {f} MiB were free"), MEMORY_TODO),
        Some(f) => r.ok(format!("{takes}, {f} MiB were free")),
        None => r.ok(takes),
    }
    // 6. The tokenizer.
    let lm_head = match backend.layout().lm_head {
        crate::backend::sophon::contract::LmHeadOutput::Logits(v) => Some(v),
        crate::backend::sophon::contract::LmHeadOutput::Token => None,
    };
    let tokenizer_ok = check_tokenizer(a, tokenizer.as_ref(), Some(lm_head), r);
    // 7. A run.
    match tokenizer {
        Some(Ok(t)) if tokenizer_ok => check_run(&mut backend, &t, simulator, r),
        _ => r.skipped("a run", "no usable tokenizer"),
    }
}

/// What to do about too little device memory.
const MEMORY_TODO: &str = "on the SoC give the NPU heap more of the DDR with the vendor's memory_edit.sh \
(from its DeviceMemoryModificationKit: `./memory_edit.sh -p` prints the NPU/VPU/VPP split, \
`./memory_edit.sh -c -npu <MiB> -vpu <MiB> -vpp <MiB>` changes it; then copy the boot.itb it \
makes to /boot and reboot); or compile a smaller bmodel (-q w4f16 / w4bf16, a shorter --seq_length)";

/// Whole MiB, rounded up (a need).
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// A size for display: MiB with one decimal, KiB below 1 MiB.
fn size_text(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes.div_ceil(1 << 10))
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}

/// Check 1: the runtime loads; its version, and libsophon's from the folder it came from.
fn check_runtime(a: &DoctorArgs, r: &mut Report) -> Option<Runtime> {
    let rt = match Runtime::load(a.model.sophon_lib.as_deref()) {
        Ok(rt) => rt,
        Err(e) => {
            let todo = if e.reason.contains("older than libsophon") {
                format!("install libsophon {MIN_LIBSOPHON} or newer and the driver of the same release")
            } else {
                format!(
                    "install libsophon {MIN_LIBSOPHON} or newer (it goes to {}), or give its lib folder with --sophon-lib",
                    ffi::DEFAULT_LIB_DIR
                )
            };
            r.problem(format!("libsophon: {e}"), todo);
            return None;
        }
    };
    let dir = rt
        .dir
        .as_ref()
        .map_or_else(|| "the loader's path".to_string(), |d| d.display().to_string());
    let bmrt = rt.version.as_deref().unwrap_or("no libbmrt_version");
    let simulator = rt.dir.as_ref().is_some_and(|d| d.join("libcmodel.so").exists());
    let installed = rt
        .dir
        .as_ref()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .and_then(|d| installed_version(&d));
    match installed {
        Some((text, v)) if v < parse_version(MIN_LIBSOPHON).unwrap_or_default() => r.problem(
            format!("libsophon {text} in {dir} is older than {MIN_LIBSOPHON}"),
            format!("install libsophon {MIN_LIBSOPHON} or newer and the driver of the same release"),
        ),
        Some((text, _)) => r.ok(format!("libsophon {text}: the runtime loads from {dir} ({bmrt})")),
        None => r.note(format!(
            "libsophon: version unknown (not an installed libsophon: e.g. the simulator); the runtime loads from \
             {dir}{} ({bmrt})",
            if simulator {
                ", the simulator's (libcmodel.so is beside it)"
            } else {
                ""
            }
        )),
    }
    Some(rt)
}

/// `X.Y.Z` from a folder inside an installed libsophon (`/opt/sophon/libsophon-X.Y.Z/lib`).
fn installed_version(dir: &Path) -> Option<(String, (u32, u32, u32))> {
    dir.ancestors().find_map(|p| {
        let name = p.file_name()?.to_str()?;
        let text = name.strip_prefix("libsophon-")?;
        parse_version(text).map(|v| (text.to_string(), v))
    })
}

/// `X.Y.Z` (a suffix after the patch number is ignored).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.trim().splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch: String = parts.next()?.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor, patch.parse().ok()?))
}

/// `release version:0.5.1   release date: 20240717-103602` (PCIe's driver_version).
fn parse_driver_version(text: &str) -> Option<((u32, u32, u32), String)> {
    let version = text.split("release version:").nth(1)?.split_whitespace().next()?;
    let date = text
        .split("release date:")
        .nth(1)
        .and_then(|d| d.split_whitespace().next())
        .unwrap_or("unknown")
        .to_string();
    Some((parse_version(version)?, date))
}

/// The build date of `uname -v` (`#1 SMP PREEMPT Wed Jan 10 12:00:00 CST 2024`) as YYYYMMDD.
fn parse_kernel_date(text: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let words: Vec<&str> = text.split_whitespace().collect();
    let m = words.iter().position(|w| MONTHS.contains(w))?;
    let month = MONTHS.iter().position(|x| *x == words[m])? as u32 + 1;
    let day: u32 = words.get(m + 1)?.parse().ok()?;
    let year: u32 = words[m..]
        .iter()
        .filter_map(|w| w.parse::<u32>().ok())
        .find(|y| (1990..3000).contains(y))?;
    (1..=31).contains(&day).then_some(year * 10000 + month * 100 + day)
}

/// The SoC's kernel must be built on or after this date (the vendor's Quick Start).
const SOC_KERNEL_DATE: u32 = 20240110;

/// Check 2: the driver's version (PCIe) or the SoC kernel's build date.
fn check_driver(a: &DoctorArgs, simulator: bool, r: &mut Report) {
    let unknown = |r: &mut Report, what: String, todo: &str| {
        if simulator {
            r.note(format!("{what} (the simulator needs no driver)"));
        } else {
            r.problem(what, todo);
        }
    };
    let pcie = a.proc_dir.join("bmsophon/driver_version");
    let update = "install the driver of libsophon 0.5.1 or newer (the vendor's FAQ: older drivers give garbled \
                  output or `get function send api error`); `cat /proc/bmsophon/driver_version` shows it";
    if let Ok(text) = std::fs::read_to_string(&pcie) {
        let min = parse_version(MIN_LIBSOPHON).unwrap_or_default();
        match parse_driver_version(&text) {
            Some((v, date)) if v >= min => r.ok(format!(
                "driver {}.{}.{} (released {date}), {} or newer as needed",
                v.0, v.1, v.2, MIN_LIBSOPHON
            )),
            Some((v, date)) => r.problem(
                format!(
                    "driver {}.{}.{} (released {date}) is older than {MIN_LIBSOPHON}",
                    v.0, v.1, v.2
                ),
                update,
            ),
            None => unknown(
                r,
                format!("driver: {} does not say a version: {:?}", pcie.display(), text.trim()),
                update,
            ),
        }
        return;
    }
    if a.dev_dir.join("bm-tpu0").exists() {
        let path = a.proc_dir.join("sys/kernel/version");
        let todo = "update the SoC's system image (SophonSDK) to one built on or after 2024-01-10 \
                    (`uname -v` shows the build date)";
        match std::fs::read_to_string(&path).ok().as_deref().map(str::trim) {
            Some(text) => match parse_kernel_date(text) {
                Some(d) if d >= SOC_KERNEL_DATE => r.ok(format!("SoC kernel built {d} (uname -v: {text})")),
                Some(d) => r.problem(format!("SoC kernel built {d}, before {SOC_KERNEL_DATE} ({text})"), todo),
                None => unknown(r, format!("SoC kernel: no build date in {text:?}"), todo),
            },
            None => unknown(r, format!("SoC kernel: cannot read {}", path.display()), todo),
        }
        return;
    }
    unknown(
        r,
        format!(
            "driver: no {} (PCIe) and no {} (SoC)",
            pcie.display(),
            a.dev_dir.join("bm-tpu0").display()
        ),
        "the driver is not loaded: install libsophon's driver (the bmsophon kernel module; `lsmod | grep bm`)",
    );
}

/// The user whose access is checked.
struct ServiceUser {
    name: String,
    uid: u32,
    gids: Vec<u32>,
    current: bool,
}

fn service_user(name: Option<&str>) -> Result<ServiceUser, String> {
    use nix::unistd::{geteuid, getgrouplist, User};
    let user = match name {
        Some(n) => User::from_name(n)
            .map_err(|e| format!("user {n}: {e}"))?
            .ok_or_else(|| format!("there is no user {n}"))?,
        None => User::from_uid(geteuid())
            .map_err(|e| format!("the current user: {e}"))?
            .ok_or_else(|| format!("the current user (uid {}) has no name", geteuid()))?,
    };
    let gids = std::ffi::CString::new(user.name.clone())
        .ok()
        .and_then(|c| getgrouplist(&c, user.gid).ok())
        .map_or_else(|| vec![user.gid.as_raw()], |g| g.iter().map(|g| g.as_raw()).collect());
    Ok(ServiceUser {
        current: user.uid == geteuid(),
        name: user.name,
        uid: user.uid.as_raw(),
        gids,
    })
}

/// Whether `user` may read and write `path`: access(2) for the current user, else the mode
/// bits against its uid and groups (ACLs are not read).
fn may_read_write(path: &Path, user: &ServiceUser) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if user.current {
        use nix::unistd::{access, AccessFlags};
        return access(path, AccessFlags::R_OK | AccessFlags::W_OK)
            .map_err(|e| format!("{} cannot open it for reading and writing ({e})", user.name));
    }
    let mode = meta.mode();
    let bits = if user.uid == 0 {
        0o6
    } else if meta.uid() == user.uid {
        (mode >> 6) & 0o7
    } else if user.gids.contains(&meta.gid()) {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    if bits & 0o6 == 0o6 {
        Ok(())
    } else {
        Err(format!(
            "{} may not read and write it (mode {:o}, owner uid {}, group gid {}; {}'s groups {:?})",
            user.name,
            mode & 0o777,
            meta.uid(),
            meta.gid(),
            user.name,
            user.gids
        ))
    }
}

/// Check 3: each device's node, and the control or ION node, readable and writable by the
/// service user. Returns whether no node is a problem.
fn check_nodes(a: &DoctorArgs, devices: &[usize], simulator: bool, r: &mut Report) -> bool {
    if simulator && !a.expect_nodes {
        r.note(format!(
            "device nodes: not needed (the simulator opens none; --expect-nodes checks them in {})",
            a.dev_dir.display()
        ));
        return true;
    }
    let user = match service_user(a.user.as_deref()) {
        Ok(u) => u,
        Err(e) => {
            r.problem(format!("device nodes: {e}"), "give an existing user with --user");
            return false;
        }
    };
    let todo_access = format!(
        "add {} to the group libsophon's udev rules give the nodes (`ls -l /dev/bm*` shows it), or serve as a user \
         that has it",
        user.name
    );
    let mut good = true;
    let mut pcie = false;
    let mut soc = false;
    let check = |r: &mut Report, path: &Path, role: &str| match may_read_write(path, &user) {
        Ok(()) => {
            r.ok(format!("{} ({role}): read/write for {}", path.display(), user.name));
            true
        }
        Err(e) => {
            r.problem(format!("{} ({role}): {e}", path.display()), &todo_access);
            false
        }
    };
    for &n in devices {
        let sophon = a.dev_dir.join(format!("bm-sophon{n}"));
        let tpu = a.dev_dir.join(format!("bm-tpu{n}"));
        if sophon.exists() {
            pcie = true;
            good &= check(r, &sophon, &format!("device {n}, PCIe"));
        } else if tpu.exists() {
            soc = true;
            good &= check(r, &tpu, &format!("device {n}, SoC"));
        } else {
            good = false;
            r.problem(
                format!(
                    "device {n}: neither {} (PCIe) nor {} (SoC) exists",
                    sophon.display(),
                    tpu.display()
                ),
                "is the driver loaded and is the device index right? `ls -l /dev/bm*` lists the chips; \
                 libsophon's driver and udev rules make the nodes",
            );
        }
    }
    let control = [
        (pcie, "bmdev-ctl", "PCIe: the device count"),
        (soc, "ion", "SoC: the memory every device buffer comes from"),
    ];
    for (wanted, name, role) in control {
        if !wanted {
            continue;
        }
        let path = a.dev_dir.join(name);
        if path.exists() {
            good &= check(r, &path, role);
        } else {
            good = false;
            r.problem(
                format!("{} ({role}) does not exist", path.display()),
                "libsophon's driver makes it: is the driver loaded? `ls -l /dev/bm* /dev/ion`",
            );
        }
    }
    good
}

/// The model-level strings of a bmodel's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BmodelHeader {
    /// `type` and `version`: the bmodel format and the compiler (`B.2.2+v1.30.2-20260831`).
    pub version: String,
    /// When it was compiled.
    pub time: String,
    /// The chip (`BM1684X`).
    pub chip: String,
}

/// The bmodel file header's magic number.
const BMODEL_MAGIC: u32 = 0xFF55_AAEE;
/// The fixed header before the flatbuffer.
const BMODEL_HEADER: usize = 64;
/// The largest flatbuffer read (real ones are a few MiB).
const MAX_FLATBUFFER: usize = 256 << 20;

/// Reads the compiler version, time and chip from a bmodel's header and the strings of its
/// flatbuffer's root table (`Model { type, version, time, chip, ... }`), without the runtime.
/// Every offset is checked: a corrupt file is an error, never a panic.
pub(crate) fn read_bmodel_header(path: &Path) -> Result<BmodelHeader, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; BMODEL_HEADER];
    f.read_exact(&mut head)
        .map_err(|_| format!("{len} bytes: shorter than a bmodel's {BMODEL_HEADER}-byte header"))?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let magic = word(0);
    if magic != BMODEL_MAGIC {
        return Err(format!(
            "not a bmodel (it starts with {:02x?}, not the magic ee aa 55 ff)",
            &head[..4]
        ));
    }
    let header_size = word(4) as u64;
    let fb_size = word(8) as usize;
    if header_size < BMODEL_HEADER as u64 || fb_size > MAX_FLATBUFFER || header_size + fb_size as u64 > len {
        return Err(format!(
            "a garbled header (header {header_size} bytes, flatbuffer {fb_size} bytes, file {len} bytes)"
        ));
    }
    let mut fb = vec![0u8; fb_size];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(header_size))
        .and_then(|_| f.read_exact(&mut fb))
        .map_err(|e| format!("cannot read its header: {e}"))?;
    let strings =
        root_strings(&fb).ok_or_else(|| "a garbled header (its model description does not parse)".to_string())?;
    let [ty, version, time, chip] = strings;
    let version = version.unwrap_or_default();
    Ok(BmodelHeader {
        version: match ty {
            Some(t) if !t.is_empty() && !version.starts_with(&t) => format!("{t}.{version}"),
            _ => version,
        },
        time: time.unwrap_or_default().trim().to_string(),
        chip: chip.unwrap_or_default(),
    })
}

/// The first `N` fields of a flatbuffer's root table read as strings (`None` for absent ones);
/// `None` for any offset outside the buffer.
fn root_strings<const N: usize>(fb: &[u8]) -> Option<[Option<String>; N]> {
    let u32_at =
        |at: usize| -> Option<u32> { Some(u32::from_le_bytes(fb.get(at..at.checked_add(4)?)?.try_into().ok()?)) };
    let u16_at =
        |at: usize| -> Option<u16> { Some(u16::from_le_bytes(fb.get(at..at.checked_add(2)?)?.try_into().ok()?)) };
    let table = u32_at(0)? as usize;
    let soffset = u32_at(table)? as i32;
    let vtable = usize::try_from(i64::try_from(table).ok()? - i64::from(soffset)).ok()?;
    let vtable_size = usize::from(u16_at(vtable)?);
    let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
    for (i, slot) in out.iter_mut().enumerate() {
        let entry = 4 + 2 * i;
        if entry + 2 > vtable_size {
            break;
        }
        let off = usize::from(u16_at(vtable.checked_add(entry)?)?);
        if off == 0 {
            continue;
        }
        let field = table.checked_add(off)?;
        let string = field.checked_add(u32_at(field)? as usize)?;
        let n = u32_at(string)? as usize;
        let start = string.checked_add(4)?;
        let bytes = fb.get(start..start.checked_add(n)?)?;
        *slot = Some(String::from_utf8_lossy(bytes).into_owned());
    }
    Some(out)
}

/// Check 4 (its first half): the header. Returns the file's size when it reads.
fn check_header(path: &Path, r: &mut Report) -> Option<u64> {
    let name = path.display();
    match read_bmodel_header(path) {
        Ok(h) if h.chip.eq_ignore_ascii_case("BM1684X") => {
            let size = std::fs::metadata(path).map_or(0, |m| m.len());
            r.ok(format!(
                "bmodel {name}: {}, compiled by {} for {} ({})",
                size_text(size),
                h.version,
                h.chip,
                h.time
            ));
            Some(size)
        }
        Ok(h) => {
            r.problem(
                format!(
                    "bmodel {name} is compiled for {:?}, not BM1684X ({})",
                    h.chip, h.version
                ),
                "compile it for the BM1684X (llm_convert.py --chip bm1684x)",
            );
            None
        }
        Err(e) => {
            r.problem(
                format!("bmodel {name}: {e}"),
                "give a TPU-MLIR-compiled .bmodel with --model (a file copied whole: compare its size and checksum)",
            );
            None
        }
    }
}

/// Check 5: each device's free memory against the bmodel's size (the KV cache is counted once
/// the bmodel has loaded). Returns each device's free MiB, when known.
fn check_memory(rt: &Runtime, devices: &[usize], file_bytes: u64, r: &mut Report) -> Vec<Option<u64>> {
    let hook: Option<u64> = std::env::var(FREE_MIB_HOOK).ok().and_then(|v| v.trim().parse().ok());
    let need = mib(file_bytes / devices.len().max(1) as u64);
    let mut free_all = Vec::new();
    for &n in devices {
        let (reported, how) = match rt.device_stat(n) {
            Ok(StatAnswer::Stat(s)) if s.mem_total > 0 => {
                let free = u64::try_from(s.mem_total.saturating_sub(s.mem_used)).unwrap_or(0);
                let heaps: Vec<String> = s
                    .heap_stat
                    .iter()
                    .take(usize::try_from(s.heap_num).unwrap_or(0).min(4))
                    .map(|h| format!("{}/{}", h.mem_avail, h.mem_total))
                    .collect();
                let heaps = if heaps.is_empty() {
                    String::new()
                } else {
                    format!("; heaps free/total MiB: {}", heaps.join(", "))
                };
                (Some(free), format!("{free} MiB free of {} MiB{heaps}", s.mem_total))
            }
            Ok(StatAnswer::Stat(_)) => (
                None,
                "free memory unknown (bm_get_stat reports 0 MiB, as the simulator does)".into(),
            ),
            Ok(StatAnswer::NoSymbol) => (None, "free memory unknown (this libbmlib has no bm_get_stat)".into()),
            Err(e) => (None, format!("free memory unknown ({e})")),
        };
        let (free, how) = match (reported, hook) {
            (Some(f), Some(h)) if h < f => (
                Some(h),
                format!("{h} MiB free ({FREE_MIB_HOOK}; the device says {how})"),
            ),
            (None, Some(h)) => (Some(h), format!("{h} MiB free ({FREE_MIB_HOOK}; {how})")),
            (f, _) => (f, how),
        };
        match free {
            Some(f) if f < need => r.problem(
                format!("device {n} memory: {how}, the bmodel alone needs {need} MiB"),
                MEMORY_TODO,
            ),
            Some(_) => r.ok(format!(
                "device {n} memory: {how}; the bmodel needs {need} MiB plus its KV cache"
            )),
            None => r.note(format!(
                "device {n} memory: {how}; the bmodel needs {need} MiB plus its KV cache"
            )),
        }
        free_all.push(free);
    }
    free_all
}

/// Whether an lm_head of `lm_head` rows is the tokenizer's `tokens` padded to a multiple of
/// 64 or 128 (a converter's habit): the extra rows are ids no text has.
fn padded_vocab(tokens: usize, lm_head: usize) -> bool {
    tokens < lm_head
        && [64, 128]
            .iter()
            .any(|&m| lm_head.is_multiple_of(m) && lm_head - tokens < m)
}

/// Check 6: the tokenizer against lm_head (`lm_head` is `Some(None)` for an lm_head that
/// returns a token, `None` when the bmodel did not load). Returns whether it is usable.
fn check_tokenizer(
    a: &DoctorArgs,
    tokenizer: Option<&Result<Tokenizer, crate::tokenizer::TokenizerError>>,
    lm_head: Option<Option<usize>>,
    r: &mut Report,
) -> bool {
    let Some(path) = a.model.tokenizer.as_deref() else {
        r.problem(
            "tokenizer: none given",
            "give the model's tokenizer.json (or the Llama-2 demos' tokenizer.model) with --tokenizer: a bmodel holds no \
             vocabulary",
        );
        return false;
    };
    let name = path.display();
    let t = match tokenizer {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            r.problem(
                format!("tokenizer: {e}"),
                "give the model's own tokenizer.json with --tokenizer",
            );
            return false;
        }
        None => return false,
    };
    let n = t.vocab_size();
    match lm_head {
        None => {
            r.note(format!(
                "tokenizer {name}: {n} tokens (not compared: the bmodel did not load)"
            ));
            true
        }
        Some(None) => {
            r.note(format!(
                "tokenizer {name}: {n} tokens; the bmodel's lm_head returns a token, so its vocabulary cannot be compared"
            ));
            true
        }
        Some(Some(m)) if m == n => {
            r.ok(format!("tokenizer {name}: {n} tokens, as many as the bmodel's lm_head"));
            true
        }
        Some(Some(m)) if padded_vocab(n, m) => {
            r.ok(format!(
                "tokenizer {name}: {n} tokens; the bmodel's lm_head has {m}: {} padding rows no text uses",
                m - n
            ));
            true
        }
        Some(Some(m)) => {
            r.problem(
                format!("tokenizer {name}: the tokenizer has {n} tokens, the bmodel's lm_head {m}: a tokenizer of another model?"),
                "give the tokenizer.json the bmodel was compiled from (the converter copies it beside the bmodel)",
            );
            // A larger one can ask for ids lm_head has no row for; a smaller one still runs.
            n < m
        }
    }
}

/// Check 7: a short prompt and [`RUN_TOKENS`] greedy tokens.
fn check_run(backend: &mut crate::backend::sophon::SophonBackend, t: &Tokenizer, simulator: bool, r: &mut Report) {
    let context = backend.info().context_length;
    let mut prompt = match t.encode(RUN_PROMPT, true) {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => vec![0],
        Err(e) => {
            r.problem(
                format!("a run: the tokenizer fails on {RUN_PROMPT:?}: {e}"),
                "give the model's own tokenizer",
            );
            return;
        }
    };
    if context <= RUN_TOKENS + 1 {
        r.skipped("a run", "the context is too short");
        return;
    }
    prompt.truncate(context - RUN_TOKENS - 1);
    let greedy = crate::sampler::SamplerConfig {
        temperature: 0.0,
        ..crate::sampler::SamplerConfig::default()
    };
    let argmax = |next: Next<'_>| match next {
        Next::Token(t) => t,
        Next::Logits(l) => {
            l.iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                )
                .0 as u32
        }
    };
    let started = Instant::now();
    let result = (|| -> Result<(std::time::Duration, std::time::Duration, Vec<u32>), crate::backend::BackendError> {
        backend.reset();
        backend.configure_sampling(0, &greedy)?;
        let mut token = argmax(backend.prefill(&prompt, 0)?);
        let ttft = started.elapsed();
        let mut tokens = vec![token];
        let decoding = Instant::now();
        for i in 0..RUN_TOKENS {
            token = argmax(backend.decode(token, prompt.len() + i)?);
            tokens.push(token);
        }
        Ok((ttft, decoding.elapsed(), tokens))
    })();
    match result {
        Ok((ttft, decode, tokens)) => {
            let rate = RUN_TOKENS as f64 / decode.as_secs_f64().max(1e-9);
            let text: String = t.decode(&tokens).chars().take(40).collect();
            r.ok(format!(
                "a run: {} prompt tokens, time to first token {:.0} ms, {RUN_TOKENS} tokens at {rate:.2} tokens/s \
                 ({}): {text:?}{}",
                prompt.len(),
                ttft.as_secs_f64() * 1000.0,
                backend.picker(0),
                if simulator {
                    " (the simulator: its timings mean nothing)"
                } else {
                    ""
                }
            ));
            if !simulator && tokens.windows(2).all(|w| w[0] == w[1]) {
                r.note(
                    "a run: every token is the same, as in the vendor FAQ's garbled output: make libsophon, the driver \
                     and the tpu-mlir that compiled the bmodel match",
                );
            }
        }
        Err(e) => r.problem(
            format!("a run: {e}"),
            "the device failed: compare the driver, libsophon and the bmodel's compiler versions above \
             (the vendor FAQ's first cause); a hung chip needs a reboot",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_dates_parse() {
        assert_eq!(
            parse_driver_version("release version:0.5.1   release date: 20240717-103602\n"),
            Some(((0, 5, 1), "20240717-103602".to_string()))
        );
        assert_eq!(parse_driver_version("garbage"), None);
        assert_eq!(parse_version("0.4.9"), Some((0, 4, 9)));
        assert_eq!(parse_version("0.5.1-rc1"), Some((0, 5, 1)));
        assert_eq!(parse_version("current"), None);
        assert_eq!(
            installed_version(Path::new("/opt/sophon/libsophon-0.5.1/lib")),
            Some(("0.5.1".to_string(), (0, 5, 1)))
        );
        assert_eq!(installed_version(Path::new("/work/.cache/tpu-mlir/lib")), None);
        assert_eq!(
            parse_kernel_date("#1 SMP PREEMPT Wed Jan 10 12:00:00 CST 2024"),
            Some(20240110)
        );
        assert_eq!(parse_kernel_date("#1 SMP"), None);
    }

    #[test]
    fn padding_rows_are_told_from_another_vocabulary() {
        assert!(padded_vocab(151_665, 151_680));
        assert!(padded_vocab(32_011, 32_064));
        assert!(!padded_vocab(32_000, 32_064));
        assert!(!padded_vocab(258, 300));
        assert!(!padded_vocab(32_000, 32_000));
        assert!(!padded_vocab(30_000, 32_000));
    }

    #[test]
    fn a_corrupt_bmodel_header_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("doctor-header-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.bmodel");
        // A well-formed flatbuffer: root table with strings type, version, time, chip.
        // The root offset, a vtable (its size 12, the table's 20, fields at 4, 8, 12, 16), the
        // table (its vtable offset, four string offsets), the strings.
        let strings = ["B", "2.2+v1.30.2", "now", "BM1684X"];
        let mut buf = vec![0u8; 4];
        let vtable = buf.len();
        for v in [12u16, 20, 4, 8, 12, 16] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let table = buf.len();
        buf[0..4].copy_from_slice(&(table as u32).to_le_bytes());
        buf.extend_from_slice(&((table - vtable) as i32).to_le_bytes());
        let fields = buf.len();
        buf.extend_from_slice(&[0u8; 16]);
        for (i, s) in strings.iter().enumerate() {
            let at = buf.len();
            buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
            buf.push(0);
            let field = fields + 4 * i;
            buf[field..field + 4].copy_from_slice(&((at - field) as u32).to_le_bytes());
        }
        let mut file = Vec::new();
        file.extend_from_slice(&BMODEL_MAGIC.to_le_bytes());
        file.extend_from_slice(&64u32.to_le_bytes());
        file.extend_from_slice(&(buf.len() as u32).to_le_bytes());
        file.resize(64, 0);
        file.extend_from_slice(&buf);
        std::fs::write(&path, &file).unwrap();
        let h = read_bmodel_header(&path).unwrap();
        assert_eq!(
            (h.version.as_str(), h.time.as_str(), h.chip.as_str()),
            ("B.2.2+v1.30.2", "now", "BM1684X")
        );
        // Every truncation and every single corrupted byte: an error or a header, never a panic.
        for cut in 0..file.len() {
            std::fs::write(&path, &file[..cut]).unwrap();
            assert!(read_bmodel_header(&path).is_err(), "cut at {cut}");
        }
        for at in 0..file.len() {
            for v in [0u8, 0x7f, 0xff] {
                let mut bad = file.clone();
                bad[at] = v;
                std::fs::write(&path, &bad).unwrap();
                let _ = read_bmodel_header(&path);
            }
        }
        let mut gguf = b"GGUF\x03\0\0\0".to_vec();
        gguf.resize(128, 0);
        std::fs::write(&path, &gguf).unwrap();
        assert!(read_bmodel_header(&path).unwrap_err().contains("not a bmodel"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
