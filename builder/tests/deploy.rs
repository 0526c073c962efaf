//! Deployments on a real store (the fixture stores tests/run mounts read-only) and an ESP
//! in a temporary directory: what `status` shows after each step of a machine's life, and
//! that a deploy cut after any of its steps leaves the previous default booting.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use argh::FromArgs;
use layerboot::deploy::commands::{plan_deploy, DeployArgs};
use layerboot::deploy::{default_of, list};

mod common;
use common::*;

fn store(fs: &str, path: &str) -> String {
    let root = fixtures().join("mnt").join(fs).join(path);
    assert!(root.is_dir(), "{} is missing: run tests/run", root.display());
    root.display().to_string()
}

fn docker_store() -> String {
    store("overlay2", "var/lib/docker")
}

/// `status --json`'s deployments as (reference, state, default, booted).
fn status(esp: &Path, store: &str, booted: &Path) -> Vec<(String, String, bool, bool)> {
    let out = ok(layerboot(&[
        "status",
        "--json",
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        store,
        "--booted",
        booted.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["reference"].as_str().unwrap().to_string(),
                d["state"].as_str().unwrap().to_string(),
                d["default"].as_bool().unwrap(),
                d["booted"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `layerboot VERB` on the machine of `esp` and the store, as `booted` says it booted.
fn on_machine(verb: &str, esp: &Path, booted: &Path) -> Output {
    let s = docker_store();
    layerboot(&[
        verb,
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        &s,
        "--booted",
        booted.to_str().unwrap(),
    ])
}

fn deploy(esp: &Path, reference: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "deploy",
        reference,
        "--esp",
        esp.to_str().unwrap(),
        "--root",
        "LABEL=store",
        "--options",
        "console=ttyS0",
    ];
    let s = docker_store();
    args.extend(["--store", &s]);
    args.extend(extra);
    ok(layerboot(&args))
}

fn booted_json(path: &Path, id: &str) {
    fs::write(
        path,
        serde_json::json!({"id": id, "store": docker_store(), "image": "x"}).to_string(),
    )
    .unwrap();
}

/// A test machine: an empty ESP and the path of its booted.json in a temporary
/// directory (kept alive by the first value), and the store's data root.
fn machine() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, String) {
    let t = tempfile::tempdir().unwrap();
    let esp = t.path().join("esp");
    fs::create_dir(&esp).unwrap();
    let booted = t.path().join("booted.json");
    (t, esp, booted, docker_store())
}

fn entries(esp: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(esp.join("loader/entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn deploy_bless_fall_back_redeploy_and_roll_back() {
    let (_t, esp, booted, s) = machine();
    let (v1, v2) = (image_id("DEMO_ID"), image_id("DEMO_V2_ID"));

    let said = deploy(&esp, "layerboot/demo", &[]);
    let id1 = &v1[7..19];
    assert!(said.contains(&format!("deployed layerboot/demo as {id1}")), "{said}");
    let dir = esp.join("layerboot").join(id1);
    for f in ["vmlinuz", "initramfs.img", "deployment.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let entry = fs::read_to_string(esp.join("loader/entries").join(&entries(&esp)[0])).unwrap();
    assert!(entry.contains(&format!("docker_image={v1}")), "pinned by ID: {entry}");
    assert!(
        entry.contains("panic=10") && entry.contains("layerboot.rescue_timeout=30"),
        "{entry}"
    );
    assert!(entry.contains(&format!("linux /layerboot/{id1}/vmlinuz")), "{entry}");
    booted_json(&booted, &v1);
    assert_eq!(
        status(&esp, &s, &booted),
        [("layerboot/demo".into(), "trying, 3 tries left".into(), true, true)]
    );

    // The running deployment blesses itself.
    ok(layerboot(&[
        "bless",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    assert_eq!(entries(&esp), [format!("layerboot-000001-{id1}.conf")]);

    // A new deployment is the default; the old one stays good.
    deploy(&esp, "layerboot/demo:v2", &[]);
    let st = status(&esp, &s, &booted);
    assert_eq!(
        st[0],
        ("layerboot/demo:v2".into(), "trying, 3 tries left".into(), true, false)
    );
    assert_eq!(st[1], ("layerboot/demo".into(), "good".into(), false, true));

    // The loader used up v2's tries: v1 is the default again, v2 is bad.
    let id2 = &v2[7..19];
    let e2 = esp
        .join("loader/entries")
        .join(format!("layerboot-000002-{id2}+3.conf"));
    fs::rename(&e2, e2.with_file_name(format!("layerboot-000002-{id2}+0-3.conf"))).unwrap();
    let st = status(&esp, &s, &booted);
    assert_eq!(st[0], ("layerboot/demo".into(), "good".into(), true, true));
    assert_eq!(st[1], ("layerboot/demo:v2".into(), "bad".into(), false, false));

    // Deploying the same image again only makes it the default, with fresh tries.
    let said = deploy(&esp, "layerboot/demo:v2", &[]);
    assert!(
        said.contains("already deployed") && said.contains("default now"),
        "{said}"
    );
    let st = status(&esp, &s, &booted);
    assert_eq!(
        st[0],
        ("layerboot/demo:v2".into(), "trying, 3 tries left".into(), true, false)
    );
    assert_eq!(entries(&esp).len(), 2, "{:?}", entries(&esp));

    // Rollback: the previous good deployment boots next.
    let said = ok(on_machine("rollback", &esp, &booted));
    assert!(said.contains(&format!("{id1} (layerboot/demo) boots next")), "{said}");
    assert_eq!(status(&esp, &s, &booted)[0].0, "layerboot/demo");

    // A rollback to an image gone from the store is refused, naming it.
    deploy(&esp, "layerboot/demo:v2", &[]);
    let other = store("containerd", "var/lib/containerd");
    let e = err(layerboot(&[
        "rollback",
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        &other,
    ]));
    assert!(e.contains("gone from the store") && e.contains(id1), "{e}");

    // bless bad marks the running deployment so the loader skips it.
    booted_json(&booted, &v2);
    ok(layerboot(&[
        "bless",
        "bad",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    let st = status(&esp, &s, &booted);
    assert_eq!(st[0].0, "layerboot/demo");
    assert_eq!(st[1].1, "bad");
}

#[test]
fn a_deploy_cut_after_any_step_leaves_the_previous_default_booting_and_the_next_deploy_finishes_it() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    fs::create_dir(&base).unwrap();
    deploy(&base, "layerboot/demo", &["--tries", "0"]);
    let (v1, v2) = (image_id("DEMO_ID"), image_id("DEMO_V2_ID"));
    let init = Path::new(env!("CARGO_BIN_EXE_layerboot")).with_file_name("layerboot-init");
    let copy = |from: &Path, to: &Path| {
        assert!(Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success());
    };
    let mut k = 0;
    loop {
        let esp = t.path().join(format!("esp{k}"));
        copy(&base, &esp);
        let s = docker_store();
        let argv = [
            "layerboot/demo:v2",
            "--root",
            "LABEL=store",
            "--options",
            "console=ttyS0",
            "--init",
            init.to_str().unwrap(),
        ];
        let args = DeployArgs::from_args(&["layerboot", "deploy"], &argv).unwrap();
        let plan = plan_deploy(&args, &esp, Path::new(&s), None, false).unwrap();
        let total = plan.steps.len();
        for step in &plan.steps[..k] {
            step.run().unwrap();
        }
        let all = list(&esp).unwrap();
        let default = default_of(&all).unwrap();
        if k == total {
            assert_eq!(default.record.reference, "layerboot/demo:v2");
            assert_entry_files_are_there(&esp, default);
            break;
        }
        assert_eq!(default.record.image_id, v1, "cut after {k} of {total} steps");
        // No temporary file is left behind by a finished step.
        let leftovers: Vec<_> = walk(&esp)
            .into_iter()
            .filter(|p| Path::new(p).file_name().unwrap().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let booted = t.path().join("booted.json");
        booted_json(&booted, &v1);
        let recorded = esp.join("layerboot").join(&v2[7..19]).join("deployment.json").is_file();
        if recorded {
            // Its record, no entry: a deploy was cut there, and status says so.
            let st = status(&esp, &s, &booted);
            assert_eq!(st.len(), 2, "cut after {k}: {st:?}");
            assert_eq!(
                st[1].1, "unfinished (a deploy was cut): the next deploy finishes it, or gc removes it",
                "cut after {k}"
            );
            // gc removes it first, and keeps the one that boots.
            let gone = t.path().join(format!("gc{k}"));
            copy(&esp, &gone);
            let said = ok(layerboot(&[
                "gc",
                "--esp",
                gone.to_str().unwrap(),
                "--booted",
                booted.to_str().unwrap(),
            ]));
            assert!(said.contains(&format!("removed deployment {}", &v2[7..19])), "{said}");
            assert!(!gone.join("layerboot").join(&v2[7..19]).exists());
            assert_eq!(status(&gone, &s, &booted).len(), 1);
        }
        // The next deploy of that image finishes (or redoes) what the cut one left.
        let said = deploy(&esp, "layerboot/demo:v2", &[]);
        assert!(
            said.contains(&format!("deployed layerboot/demo:v2 as {}", &v2[7..19])),
            "cut after {k}: {said}"
        );
        let all = list(&esp).unwrap();
        assert_eq!(all.len(), 2, "cut after {k}");
        let default = default_of(&all).unwrap();
        assert_eq!(default.record.image_id, v2, "cut after {k}");
        assert_eq!(default.state(), "trying, 3 tries left", "cut after {k}");
        assert_entry_files_are_there(&esp, default);
        assert_eq!(entries(&esp).len(), 2, "cut after {k}: {:?}", entries(&esp));
        k += 1;
    }
}

/// Every file the deployment's entry names is on the ESP, as its record says.
fn assert_entry_files_are_there(esp: &Path, d: &layerboot::deploy::Deployment) {
    let text = fs::read_to_string(&d.entry.as_ref().unwrap().0).unwrap();
    for l in text
        .lines()
        .filter(|l| l.starts_with("linux ") || l.starts_with("initrd "))
    {
        let p = esp.join(l.split_once(' ').unwrap().1.trim_start_matches('/'));
        assert!(p.is_file(), "{}", p.display());
    }
    if let Some(files) = &d.record.files {
        files.check(&d.dir).unwrap();
    }
}

#[test]
fn a_cut_deploys_files_that_are_not_as_recorded_are_written_again() {
    let (_t, esp, _booted, s) = machine();
    deploy(&esp, "layerboot/demo", &["--tries", "0"]);
    let v2 = image_id("DEMO_V2_ID");
    let dir = esp.join("layerboot").join(&v2[7..19]);
    let init = Path::new(env!("CARGO_BIN_EXE_layerboot")).with_file_name("layerboot-init");
    let argv = [
        "layerboot/demo:v2",
        "--root",
        "LABEL=store",
        "--init",
        init.to_str().unwrap(),
    ];
    let args = DeployArgs::from_args(&["layerboot", "deploy"], &argv).unwrap();
    // Cut after its record (every step but the entry), then each kind of damage.
    let cut = |esp: &Path| {
        let plan = plan_deploy(&args, esp, Path::new(&s), None, false).unwrap();
        let n = plan.steps.len();
        for step in &plan.steps[..n - 1] {
            step.run().unwrap();
        }
    };
    let damages: [(&str, &dyn Fn()); 3] = [
        ("a short initramfs", &|| {
            let p = dir.join("initramfs.img");
            let data = fs::read(&p).unwrap();
            fs::write(&p, &data[..data.len() / 2]).unwrap();
        }),
        ("another kernel of the same size", &|| {
            let p = dir.join("vmlinuz");
            let mut data = fs::read(&p).unwrap();
            let last = data.len() - 1;
            data[last] ^= 0xff;
            fs::write(&p, data).unwrap();
        }),
        ("a record from before sizes and digests", &|| {
            let p = dir.join("deployment.json");
            let mut r: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            r.as_object_mut()
                .unwrap()
                .remove("files")
                .expect("deploy records its files");
            fs::write(&p, r.to_string()).unwrap();
        }),
    ];
    for (what, damage) in damages {
        cut(&esp);
        damage();
        let out = layerboot(&[
            "deploy",
            "layerboot/demo:v2",
            "--esp",
            esp.to_str().unwrap(),
            "--store",
            &s,
            "--root",
            "LABEL=store",
        ]);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out);
        assert!(
            said.contains("was cut") && said.contains("written again"),
            "{what}: {said}"
        );
        let all = list(&esp).unwrap();
        let d = default_of(&all).unwrap();
        assert_eq!(d.record.image_id, v2, "{what}");
        d.record.files.as_ref().expect("recorded again").check(&d.dir).unwrap();
        assert_entry_files_are_there(&esp, d);
        // Back to a cut state for the next damage.
        fs::remove_file(&d.entry.as_ref().unwrap().0).unwrap();
    }
}

/// `grub-script-check` (grub-common) accepts the snippet, as GRUB's own parser would.
fn grub_script_check(snippet: &str) {
    use std::io::Write;
    let mut child = Command::new("grub-script-check")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("grub-script-check runs (fix: apt-get install grub-common)");
    child.stdin.take().unwrap().write_all(snippet.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "grub-script-check refused it: {}\n{snippet}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn a_full_esp_is_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    let esp = t.path().join("esp");
    fs::create_dir(&esp).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&esp)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs (tests run as root)");
    let s = docker_store();
    let out = layerboot(&[
        "deploy",
        "layerboot/demo",
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        &s,
        "--root",
        "LABEL=store",
    ]);
    let listing = walk(&esp);
    let _ = Command::new("umount").arg(&esp).status();
    let e = err(out);
    assert!(
        e.contains("MiB free") && e.contains("Nothing was written") && e.contains("fix:"),
        "{e}"
    );
    assert!(listing.is_empty(), "{listing:?}");
}

#[test]
fn gc_keeps_the_newest_the_running_and_the_newest_good_and_unpins_the_default() {
    let t = tempfile::tempdir().unwrap();
    let esp = t.path().join("esp");
    fs::create_dir_all(esp.join("loader")).unwrap();
    fs::write(
        esp.join("loader/loader.conf"),
        "timeout 0\ndefault layerboot-demo.conf\n",
    )
    .unwrap();
    let booted = t.path().join("booted.json");
    deploy(&esp, "layerboot/demo", &["--tries", "0"]);
    assert!(
        !fs::read_to_string(esp.join("loader/loader.conf"))
            .unwrap()
            .contains("default"),
        "a pinned layerboot default would defeat the sort order"
    );
    deploy(&esp, "layerboot/demo:v2", &[]);
    // Two older recorded deployments, made by hand as an earlier deploy would leave them.
    let v1 = image_id("DEMO_ID");
    for (n, fake) in [(0u64, "a"), (0, "b")] {
        let id = format!("sha256:{}", fake.repeat(64));
        let dir = esp.join("layerboot").join(&id[7..19]);
        fs::create_dir_all(&dir).unwrap();
        let mut record: serde_json::Value =
            serde_json::from_slice(&fs::read(esp.join("layerboot").join(&v1[7..19]).join("deployment.json")).unwrap())
                .unwrap();
        record["image_id"] = id.clone().into();
        record["serial"] = n.into();
        record["reference"] = format!("old/{fake}").into();
        fs::write(dir.join("deployment.json"), record.to_string()).unwrap();
        fs::write(
            esp.join("loader/entries")
                .join(format!("layerboot-000000-{}.conf", &id[7..19])),
            format!("# written by layerboot deploy for {id}\ntitle old\nsort-key layerboot\nversion 000000\n"),
        )
        .unwrap();
    }
    // Not layerboot's: never touched.
    fs::create_dir_all(esp.join("layerboot/notours")).unwrap();
    fs::write(esp.join("loader/entries/debian.conf"), "title Debian\n").unwrap();
    booted_json(&booted, &v1);

    let said = ok(layerboot(&[
        "gc",
        "--keep-deployments",
        "1",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    assert!(said.contains("old/a") && said.contains("old/b"), "{said}");
    let st = status(&esp, &docker_store(), &booted);
    let refs: Vec<&str> = st.iter().map(|d| d.0.as_str()).collect();
    // keep 1: the newest (v2, trying) is kept, and the running, newest good v1 is never removed.
    assert_eq!(refs, ["layerboot/demo:v2", "layerboot/demo"]);
    assert!(esp.join("layerboot/notours").is_dir());
    assert!(esp.join("loader/entries/debian.conf").is_file());
    assert_eq!(entries(&esp).len(), 3, "{:?}", entries(&esp));
}

#[test]
fn a_second_command_waits_for_the_one_changing_the_esp() {
    use std::io::{BufRead, BufReader};
    use std::time::Duration;
    let (_t, esp, booted, s) = machine();
    // Another command holds the ESP, as a deploy writing its files does.
    let held = nix::fcntl::Flock::lock(fs::File::open(&esp).unwrap(), nix::fcntl::FlockArg::LockExclusive).unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_layerboot"))
        .args([
            "deploy",
            "layerboot/demo",
            "--esp",
            esp.to_str().unwrap(),
            "--root",
            "LABEL=store",
        ])
        .args(["--store", &s, "--booted", booted.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its standard error, line by line as it comes, and whole at the end.
    let (lines, said) = std::sync::mpsc::channel();
    let stderr = second.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    // It builds the initramfs first, then says it waits.
    loop {
        match said.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains("waiting for another layerboot") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = second.kill();
                panic!("it never said it waits: {}", reader.join().unwrap());
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(second.try_wait().unwrap().is_none(), "it did not wait");
    let wrote = walk(&esp);
    assert!(wrote.is_empty(), "it wrote while another held the ESP: {wrote:?}");
    drop(held);
    let done = second.wait().unwrap();
    let said = reader.join().unwrap();
    assert!(done.success(), "{said}");
    assert_eq!(status(&esp, &s, &booted).len(), 1);
}

#[test]
fn a_command_on_an_esp_that_is_not_there_names_it() {
    let (t, _esp, booted, _store) = machine();
    let missing = t.path().join("not-mounted");
    let said = err(layerboot(&[
        "gc",
        "--esp",
        missing.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    assert!(
        said.contains("cannot open the ESP") && said.contains("not-mounted") && said.contains("fix:"),
        "{said}"
    );
}

#[test]
fn deploy_needs_its_machine_named_off_a_layerboot_boot() {
    let t = tempfile::tempdir().unwrap();
    let none = t.path().join("no-booted.json");
    let (esp, s) = (t.path().to_str().unwrap(), docker_store());
    // Off a layerboot boot (no booted.json), with more of the machine named each time.
    let deploy = |more: &[&str]| {
        let base = ["deploy", "layerboot/demo", "--booted", none.to_str().unwrap()];
        err(layerboot(&[&base[..], more].concat()))
    };
    assert!(deploy(&[]).contains("--esp is needed"));
    // Tries are bounded (GRUB's snippet has a line per try), first of all.
    for tries in ["17", "200000"] {
        let e = deploy(&["--esp", esp, "--store", &s, "--root", "LABEL=store", "--tries", tries]);
        assert!(
            e.contains(&format!("--tries {tries}")) && e.contains("16") && e.contains("fix:"),
            "{e}"
        );
    }
    assert!(deploy(&["--esp", esp]).contains("--store is needed"));
    assert!(deploy(&["--esp", esp, "--store", &s]).contains("--root is needed"));
    // Nothing that could end a boot loader's line or entry gets into one.
    let e = deploy(&[
        "--esp",
        esp,
        "--store",
        &s,
        "--root",
        "LABEL=store",
        "--options",
        "quiet;reboot",
    ]);
    assert!(e.contains("';'") && e.contains("fix:"), "{e}");
    assert!(fs::read_dir(t.path()).unwrap().next().is_none(), "nothing written");
}

#[test]
fn grub_deployments_count_in_their_grubenv_and_fall_back_in_the_snippet() {
    let t = tempfile::tempdir().unwrap();
    let esp = t.path().join("esp");
    fs::create_dir_all(esp.join("EFI/debian")).unwrap();
    fs::write(esp.join("EFI/debian/grub.cfg"), "source /layerboot/grub.cfg\n").unwrap();
    let booted = t.path().join("booted.json");
    let s = docker_store();
    let (v1, v2) = (image_id("DEMO_ID"), image_id("DEMO_V2_ID"));
    let (id1, id2) = (&v1[7..19], &v2[7..19]);

    // GRUB does not say which partition is the ESP: the entry must.
    let e = err(layerboot(&[
        "deploy",
        "layerboot/demo",
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        &s,
        "--root",
        "LABEL=store",
    ]));
    assert!(e.contains("--esp-device is needed with GRUB"), "{e}");

    deploy(&esp, "layerboot/demo", &["--esp-device", "LABEL=ESP"]);
    deploy(
        &esp,
        "layerboot/demo:v2",
        &["--esp-device", "LABEL=ESP", "--tries", "2"],
    );
    assert!(
        !esp.join("loader").exists(),
        "the ESP's loader (GRUB) was found, no BLS entries"
    );
    let env = layerboot_init::grubenv::parse(&fs::read(esp.join("layerboot/grubenv")).unwrap()).unwrap();
    assert_eq!(
        env,
        [
            (format!("lb_{id1}"), "3".to_string()),
            (format!("lb_{id2}"), "2".to_string())
        ]
    );
    let snippet = fs::read_to_string(esp.join("layerboot/grub.cfg")).unwrap();
    grub_script_check(&snippet);
    let first = snippet.find(&format!("lb_default=layerboot-{id2}")).unwrap();
    assert!(
        first < snippet.find(&format!("lb_default=layerboot-{id1}")).unwrap(),
        "{snippet}"
    );
    assert!(
        snippet.contains("layerboot.esp=LABEL=ESP") && snippet.contains(&format!("layerboot.grub={id2} $lb_counted\n")),
        "the entry tells /init what to bless: {snippet}"
    );
    booted_json(&booted, &v1);
    let st = status(&esp, &s, &booted);
    assert_eq!(
        st[0],
        ("layerboot/demo:v2".into(), "trying, 2 tries left".into(), true, false)
    );

    // GRUB used up v2's tries (as its entry's save_env does): v1 is the default.
    let mut env = env;
    layerboot_init::grubenv::set(&mut env, &format!("lb_{id2}"), "0");
    fs::write(
        esp.join("layerboot/grubenv"),
        layerboot_init::grubenv::render(&env).unwrap(),
    )
    .unwrap();
    let st = status(&esp, &s, &booted);
    assert_eq!(st[0].0, "layerboot/demo");
    assert_eq!(st[1].1, "bad");

    // The running v1 is blessed; a redeploy of v2 gives it its tries back and the top.
    ok(layerboot(&[
        "bless",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    deploy(&esp, "layerboot/demo:v2", &["--esp-device", "LABEL=ESP"]);
    let st = status(&esp, &s, &booted);
    assert_eq!(
        st[0],
        ("layerboot/demo:v2".into(), "trying, 2 tries left".into(), true, false)
    );
    assert_eq!(st[1], ("layerboot/demo".into(), "good".into(), false, true));
    let said = ok(on_machine("rollback", &esp, &booted));
    assert!(said.contains(&format!("{id1} (layerboot/demo) boots next")), "{said}");
    let snippet = fs::read_to_string(esp.join("layerboot/grub.cfg")).unwrap();
    grub_script_check(&snippet);
    assert!(
        snippet.find(&format!("lb_default=layerboot-{id1}")).unwrap()
            < snippet.find(&format!("lb_default=layerboot-{id2}")).unwrap(),
        "{snippet}"
    );
}

#[test]
fn upgrade_redeploys_a_moved_reference_with_the_recorded_options() {
    let (_t, esp, booted, s) = machine();
    let (v1, v2) = (image_id("DEMO_ID"), image_id("DEMO_V2_ID"));
    deploy(&esp, "layerboot/demo", &["--module", "loop", "--tries", "2"]);
    booted_json(&booted, &v1);
    let upgrade = |check: bool| {
        let mut a = vec![
            "upgrade",
            "--esp",
            esp.to_str().unwrap(),
            "--store",
            &s,
            "--booted",
            booted.to_str().unwrap(),
        ];
        if check {
            a.push("--check");
        }
        ok(layerboot(&a))
    };
    assert!(upgrade(false).contains("layerboot/demo is up to date"));

    // The tag moves (as a `docker pull` would move it): here, the record is pointed at v2's tag.
    let record = esp.join("layerboot").join(&v1[7..19]).join("deployment.json");
    let mut r: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    r["reference"] = "layerboot/demo:v2".into();
    fs::write(&record, r.to_string()).unwrap();
    let said = upgrade(true);
    assert!(said.contains(&format!("now names {}", &v2[7..19])), "{said}");
    assert_eq!(status(&esp, &s, &booted).len(), 1, "--check deploys nothing");

    let said = upgrade(false);
    assert!(
        said.contains(&format!("deployed layerboot/demo:v2 as {}", &v2[7..19])),
        "{said}"
    );
    let new: serde_json::Value =
        serde_json::from_slice(&fs::read(esp.join("layerboot").join(&v2[7..19]).join("deployment.json")).unwrap())
            .unwrap();
    assert_eq!(
        new["initramfs_args"],
        serde_json::json!(["--module", "loop"]),
        "initramfs options redone"
    );
    assert_eq!(new["tries"], 2);
    let options = new["options"].as_str().unwrap();
    assert!(
        options.contains("root=LABEL=store rw")
            && options.contains("console=ttyS0")
            && options.contains(&format!("docker_image={v2}")),
        "kernel arguments redone: {options}"
    );
    assert_eq!(options.matches("root=").count(), 1, "{options}");
    assert_eq!(options.matches("panic=").count(), 1, "{options}");
    assert!(!options.contains(&v1), "{options}");
}

#[test]
fn an_entry_left_twice_by_a_cut_counts_once_and_goes_with_the_next_change() {
    let (_t, esp, booted, s) = machine();
    let v1 = image_id("DEMO_ID");
    let id1 = &v1[7..19];
    deploy(&esp, "layerboot/demo", &["--tries", "0"]);
    deploy(&esp, "layerboot/demo:v2", &["--tries", "0"]);
    // A rollback cut after its new entry was written, before the old one was removed.
    let dir = esp.join("loader/entries");
    let old = dir.join(format!("layerboot-000001-{id1}.conf"));
    let text = fs::read_to_string(&old)
        .unwrap()
        .replace("version 000001", "version 000003");
    fs::write(dir.join(format!("layerboot-000003-{id1}.conf")), text).unwrap();
    booted_json(&booted, &v1);
    let st = status(&esp, &s, &booted);
    assert_eq!(st.len(), 2, "{st:?}");
    assert_eq!(st[0].0, "layerboot/demo", "the newer of the two entries counts");
    // The next change of that deployment removes both old names.
    ok(layerboot(&[
        "bless",
        "bad",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    deploy(&esp, "layerboot/demo", &[]);
    let names = entries(&esp);
    assert_eq!(names.iter().filter(|n| n.contains(id1)).count(), 1, "{names:?}");
}

#[test]
fn one_bad_file_on_the_esp_stops_no_command_and_a_hand_written_entry_stays() {
    let (_t, esp, booted, s) = machine();
    let (v1, v2) = (image_id("DEMO_ID"), image_id("DEMO_V2_ID"));
    let (id1, id2) = (&v1[7..19], &v2[7..19]);
    deploy(&esp, "layerboot/demo", &["--tries", "0"]);
    let dir = esp.join("loader/entries");
    // What a damaged FAT or a person may leave: a directory named as an entry, an entry
    // that is not UTF-8, and an entry written by hand for debugging, from layerboot's.
    fs::create_dir(dir.join(format!("layerboot-000090-{id2}.conf"))).unwrap();
    fs::write(dir.join(format!("layerboot-000091-{id1}+2.conf")), b"title \xff\xfe\n").unwrap();
    let own = fs::read_to_string(dir.join(format!("layerboot-000001-{id1}.conf"))).unwrap();
    let debug = dir.join(format!("layerboot-debug-{id1}.conf"));
    fs::write(
        &debug,
        own.replace("version 000001", "version 000099") + "# init=/bin/sh\n",
    )
    .unwrap();
    booted_json(&booted, &v1);

    let st = status(&esp, &s, &booted);
    assert_eq!(st, [("layerboot/demo".into(), "good".into(), true, true)]);
    let out = layerboot(&[
        "status",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]);
    let note = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        note.contains("not a readable boot entry") && note.contains("000090"),
        "{note}"
    );
    deploy(&esp, "layerboot/demo:v2", &[]);
    ok(layerboot(&[
        "bless",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    ok(on_machine("rollback", &esp, &booted));
    assert_eq!(status(&esp, &s, &booted)[0].0, "layerboot/demo");
    deploy(&esp, "layerboot/demo:v2", &[]);
    ok(layerboot(&[
        "upgrade",
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        &s,
        "--booted",
        booted.to_str().unwrap(),
    ]));
    ok(layerboot(&[
        "gc",
        "--keep-deployments",
        "1",
        "--esp",
        esp.to_str().unwrap(),
        "--booted",
        booted.to_str().unwrap(),
    ]));
    assert!(
        debug.is_file(),
        "a hand-written entry is never layerboot's: {:?}",
        entries(&esp)
    );
    assert!(
        fs::read_to_string(&debug).unwrap().contains("version 000099"),
        "and never rewritten"
    );
    // The deployment it copied is still the machine's own, with one entry.
    let names = entries(&esp);
    let own: Vec<_> = names
        .iter()
        .filter(|n| n.starts_with("layerboot-0") && n.contains(id1) && !n.contains("000091"))
        .collect();
    assert_eq!(own.len(), 1, "{names:?}");
}

#[test]
fn two_images_with_the_same_first_12_digits_get_two_deployments() {
    let (_t, esp, booted, s) = machine();
    let v2 = image_id("DEMO_V2_ID");
    let id2 = &v2[7..19];
    deploy(&esp, "layerboot/demo", &["--tries", "0"]);
    // Another image whose ID starts with the same 12 digits holds ESP/layerboot/<id12>,
    // as its deploy left it (record, files, entry).
    let v1 = image_id("DEMO_ID");
    let twin = format!("sha256:{id2}{}", "0".repeat(52));
    assert_ne!(twin, v2);
    let twin_dir = esp.join("layerboot").join(id2);
    fs::create_dir_all(&twin_dir).unwrap();
    let mut record: serde_json::Value =
        serde_json::from_slice(&fs::read(esp.join("layerboot").join(&v1[7..19]).join("deployment.json")).unwrap())
            .unwrap();
    record["image_id"] = twin.clone().into();
    record["reference"] = "twin".into();
    record["serial"] = 5.into();
    record["options"] = format!("root=LABEL=store rw docker_image={twin}").into();
    record.as_object_mut().unwrap().remove("files");
    fs::write(twin_dir.join("deployment.json"), record.to_string()).unwrap();
    fs::write(twin_dir.join("vmlinuz"), "twin's kernel").unwrap();
    fs::write(
        esp.join("loader/entries").join(format!("layerboot-000005-{id2}.conf")),
        format!(
            "# written by layerboot deploy for {twin}\ntitle twin\nsort-key layerboot\nversion 000005\n\
             linux /layerboot/{id2}/vmlinuz\noptions root=LABEL=store docker_image={twin}\n"
        ),
    )
    .unwrap();
    booted_json(&booted, &v1);
    assert_eq!(status(&esp, &s, &booted).len(), 2);

    let said = deploy(&esp, "layerboot/demo:v2", &["--keep-deployments", "5"]);
    let long = &v2[7..23];
    assert!(said.contains(&format!("as {long}")), "{said}");
    assert_eq!(
        fs::read_to_string(twin_dir.join("vmlinuz")).unwrap(),
        "twin's kernel",
        "the twin is untouched"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&fs::read(twin_dir.join("deployment.json")).unwrap()).unwrap()
            ["image_id"],
        twin.as_str()
    );
    let st = status(&esp, &s, &booted);
    let refs: Vec<&str> = st.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(refs, ["layerboot/demo:v2", "twin", "layerboot/demo"]);
    let entry = entries(&esp)
        .into_iter()
        .find(|n| n.contains(long))
        .expect("its own entry");
    let text = fs::read_to_string(esp.join("loader/entries").join(entry)).unwrap();
    assert!(text.contains(&format!("linux /layerboot/{long}/vmlinuz")), "{text}");
    // Deploying it again finds it under its long name.
    let said = deploy(&esp, "layerboot/demo:v2", &["--keep-deployments", "5"]);
    assert!(said.contains("already deployed"), "{said}");
}

#[test]
fn a_store_named_on_the_command_line_gets_its_docker_path_from_its_mount() {
    let (t, esp, _booted, _s) = machine();
    // The store's partition mounted at its var/lib, as /mnt/docker would be.
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let lib = fixtures().join("mnt/overlay2/var/lib");
    assert!(Command::new("mount")
        .arg("--bind")
        .arg(&lib)
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    let store = mnt.join("docker");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "deploy",
            "layerboot/demo",
            "--esp",
            esp.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--root",
            "LABEL=store",
        ];
        a.extend(extra);
        layerboot(&a)
    };
    let refused = run(&["--rootflags", "subvol=@"]);
    let done = run(&[]);
    let _ = Command::new("umount").arg(&mnt).status();
    let e = err(refused);
    assert!(
        e.contains("docker_path") && e.contains("--docker-path") && e.contains("fix:"),
        "{e}"
    );
    ok(done);
    let entry = fs::read_to_string(esp.join("loader/entries").join(&entries(&esp)[0])).unwrap();
    assert!(entry.contains(" docker_path=var/lib/docker "), "{entry}");
}

#[test]
fn every_directory_a_deploy_makes_on_the_esp_is_flushed_with_its_parent() {
    let (t, esp, _booted, s) = machine();
    let v1 = image_id("DEMO_ID");
    let trace = t.path().join("trace");
    let out = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_layerboot"))
        .args([
            "deploy",
            "layerboot/demo",
            "--esp",
            esp.to_str().unwrap(),
            "--store",
            &s,
        ])
        .args(["--root", "LABEL=store"])
        .output()
        .expect("strace runs (fix: apt-get install strace)");
    ok(out);
    let trace = fs::read_to_string(trace).unwrap();
    // On FAT a new directory's long name lies in its parent: each parent is flushed.
    for dir in [
        esp.clone(),
        esp.join("layerboot"),
        esp.join("layerboot").join(&v1[7..19]),
        esp.join("loader"),
        esp.join("loader/entries"),
    ] {
        assert!(
            trace.contains(&format!("<{}>)", dir.display())),
            "{} is never flushed:\n{trace}",
            dir.display()
        );
    }
}
