//! The reboot deadline of a counted boot (`init/src/deadline.rs`): a boot that never gets
//! good reboots on its own, from emergency mode under systemd and from a hung boot script
//! under sysvinit, and a blessed boot keeps running past its deadline. The blessed
//! sysvinit boot is also the suite's boot of an image whose init is not systemd. Disks and ESPs are
//! prepared on the host; each QEMU run is one boot (a reboot ends it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vm_tests::*;

fn no_panic(console: &str) {
    assert!(
        !console.contains("Kernel panic"),
        "kernel panic:\n{}",
        tail(console, 40)
    );
}

/// The kernel's last words before QEMU (`-no-reboot`) ends: a reboot, not a power-off.
fn rebooted(console: &str) -> bool {
    console.contains("reboot: Restarting system")
}

/// A FAT image for `layerboot.esp=/dev/vdb`, holding layerboot's grubenv with `vars`
/// (GRUB itself is not under test: the command line names the deployment).
fn grub_esp(dir: &Path, vars: &[(String, String)]) -> PathBuf {
    let img = dir.join("esp.img");
    fs::File::create(&img).unwrap().set_len(34 << 20).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "32", "-n", "ESP"]).arg(&img));
    let i = img.to_str().unwrap();
    run(Command::new("mmd").args(["-i", i, "/layerboot"]));
    let env = dir.join("grubenv");
    fs::write(&env, layerboot_init::grubenv::render(vars).unwrap()).unwrap();
    run(Command::new("mcopy")
        .args(["-i", i])
        .arg(&env)
        .arg("::/layerboot/grubenv"));
    img
}

fn grubenv_of(esp: &Path) -> Vec<(String, String)> {
    let out = esp.with_extension("grubenv-after");
    let _ = fs::remove_file(&out);
    run(Command::new("mcopy")
        .args(["-n", "-i"])
        .arg(esp)
        .arg("::/layerboot/grubenv")
        .arg(&out));
    layerboot_init::grubenv::parse(&fs::read(&out).unwrap()).unwrap()
}

/// The sysvinit fixture with `rc_local` as its `/etc/rc.local`, on the overlay2 store.
fn sysv_disk(dir: &Path, rc_local: &str) -> PathBuf {
    let disk = copy_store_disk("overlay2", dir);
    let m = LoopMount::new(&disk, &dir.join("mnt"), false);
    let top = m.0.join("toplayer");
    write_toplayer(&top, "vm-sysv-deadline");
    let rc = top.join("etc/rc.local");
    fs::write(&rc, rc_local).unwrap();
    fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    disk
}

const SYSV_CMDLINE: &str = "root=LABEL=lb-overlay docker_image=layerboot/demo:sysv toplayer=LABEL=lb-overlay \
     toplayer_path=/toplayer layerboot.rescue_timeout=0 layerboot.grub=0123456789ab layerboot.esp=/dev/vdb layerboot.counted=1";

/// A sysvinit boot whose boot script blesses it, then waits until well past the
/// deadline: it is not rebooted, the helper stood down and is gone, and while it ran it
/// held nothing in the store or the new root. Then a boot whose boot script hangs: it
/// reboots on its own at the deadline. The deadlines leave room for a slow boot: with
/// two VMs and a build on two cores, sysvinit reached rc.local 100 s after the switch.
#[test]
fn a_sysvinit_boot_reboots_at_its_deadline_unless_blessed() {
    let dir = test_dir("deadline-sysv");
    let var = "lb_0123456789ab".to_string();
    let esp = grub_esp(&dir, &[(var.clone(), "1".to_string())]);
    let blessing = r#"#!/bin/sh
# The helper, as the image sees it, before the bless: where its root and cwd are, and
# what it holds open (the console and the kernel log, nothing of the store).
for p in /proc/[0-9]*; do
  if tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^layerboot-after-switch '; then
    printf '|dl| root: %s\n|dl| cwd: %s\n' "$(readlink $p/root)" "$(readlink $p/cwd)" > /dev/console
    printf '|dl| fds: %s\n' "$(for f in $p/fd/*; do readlink $f; done | sort -u | tr '\n' ';')" > /dev/console
  fi
done
/run/initramfs/layerboot-init --bless
due=$(sed -n 's/^due=\([0-9]*\) .*/\1/p' /run/layerboot/deadline)
printf '|dl| due: %s\n' "$due" > /dev/console
while [ "$(cut -d. -f1 /proc/uptime)" -le $((due + 10)) ]; do sleep 1; done
printf '|dl| stopped: %s\n' "$(cat /run/layerboot/deadline-stop)" > /dev/console
printf '|dl| helpers left: %s\n' "$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ' | grep -c '[l]ayerboot-after-switch --after')" > /dev/console
/usr/local/sbin/layerboot-report
exec poweroff -f
"#;
    let disk = sysv_disk(&dir, blessing);
    let console = Qemu {
        timeout: Duration::from_secs(600),
        ..Qemu::new(
            vec![disk.clone(), esp.clone()],
            format!("{SYSV_CMDLINE} layerboot.bless_timeout=180"),
            dir.join("blessed.log"),
        )
    }
    .run();
    no_panic(&console);
    let said = |key: &str| {
        tagged_lines(&console, "|dl| ")
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
            .unwrap_or_else(|| panic!("no '{key}' from the guest:\n{}", tail(&console, 60)))
    };
    assert_eq!(said("root"), "/run/layerboot", "the helper left the new root");
    assert_eq!(said("cwd"), "/run/layerboot");
    // What /init's descriptors 0-2 were opened on reads "/dev/console (deleted)": the
    // initramfs's node, freed with it.
    for fd in said("fds").split(';').filter(|f| !f.is_empty()) {
        assert!(
            fd.starts_with("/dev/") || fd == "/sys",
            "the helper holds only the console, the kernel log and sysfs, nothing of the store or the new root: {}",
            said("fds")
        );
    }
    assert!(said("due").parse::<u64>().is_ok_and(|d| d >= 180), "{}", said("due"));
    assert!(said("stopped").contains("the boot is good"), "{}", said("stopped"));
    assert_eq!(said("helpers left"), "0", "the helper exited once stood down");
    // The image's init is sysvinit, not systemd: layerboot assumes nothing of the init.
    let r = report(&console);
    common_checks(&r, "vm-sysv-deadline", "sysv");
    assert_eq!(r["pid1"], "init", "sysvinit's init is PID 1");
    assert!(
        console.contains("INIT: version"),
        "sysvinit's banner:\n{}",
        tail(&console, 30)
    );
    assert!(r["root"].starts_with("overlay "), "{}", r["root"]);
    assert!(
        !rebooted(&console),
        "a blessed boot is not rebooted:\n{}",
        tail(&console, 30)
    );
    assert!(!console.contains("rebooting, so that"), "{}", tail(&console, 30));
    let vars = grubenv_of(&esp);
    assert_eq!(
        vars,
        [(var.clone(), "good".to_string())],
        "blessed in the ESP's grubenv"
    );

    // The same machine with a boot script that never ends: the deadline reboots it.
    let hung = "#!/bin/sh\necho '|dl| hanging' > /dev/console\nexec sleep 100000\n";
    let disk = sysv_disk(&dir, hung);
    let console = Qemu {
        timeout: Duration::from_secs(600),
        ..Qemu::new(
            vec![disk, esp],
            format!("{SYSV_CMDLINE} layerboot.bless_timeout=120"),
            dir.join("hung.log"),
        )
    }
    .run();
    no_panic(&console);
    assert!(console.contains("|dl| hanging"), "{}", tail(&console, 40));
    assert!(
        console.contains("the machine reboots in"),
        "the console was told before:\n{}",
        tail(&console, 40)
    );
    assert!(
        console.contains("not blessed within layerboot.bless_timeout=120: rebooting"),
        "{}",
        tail(&console, 40)
    );
    assert!(rebooted(&console), "it rebooted:\n{}", tail(&console, 40));
    assert!(!console.contains("LAYERBOOT-REPORT-BEGIN"));
}

/// A new deployment whose fstab names a missing disk lands in systemd's emergency mode.
/// The console there names the coming reboot; the deadline reboots it, and systemd-boot,
/// its one try used, falls back to the deployment before it, which blesses itself.
#[test]
fn a_deployment_stuck_in_emergency_mode_reboots_and_falls_back() {
    use vm_tests::disk::{esp_tree, gpt_disk_with_esp_tree, Loader};
    let dir = test_dir("deadline-emergency");
    let store = copy_store_disk("overlay2", &dir);
    {
        let m = LoopMount::new(&store, &dir.join("mnt"), false);
        write_toplayer(&m.0.join("toplayer"), "vm-deadline");
        report_after_bless(&m.0.join("toplayer"));
        // The new deployment's own top layer: the same, with a disk in its fstab that is not there.
        let bad = m.0.join("toplayer-bad");
        write_toplayer(&bad, "vm-deadline-bad");
        fs::write(
            bad.join("etc/fstab"),
            "LABEL=layerboot-missing /mnt/missing ext4 defaults,x-systemd.device-timeout=10s 0 2\n",
        )
        .unwrap();
    }
    let esp = dir.join("esp");
    fs::create_dir_all(&esp).unwrap();
    let root = format!("PARTUUID={}", vm_tests::disk::STORE_PARTUUID);
    let data_root = fixture_store("overlay2");
    let deploy = |reference: &str, toplayer_path: &str, options: &str| {
        run(layerboot().args([
            "deploy",
            reference,
            "--esp",
            esp.to_str().unwrap(),
            "--store",
            data_root.to_str().unwrap(),
            "--root",
            &root,
            "--toplayer",
            &root,
            "--toplayer-path",
            toplayer_path,
            "--loader",
            "systemd-boot",
            "--tries",
            "1",
            "--options",
            options,
        ]))
    };
    deploy(
        "layerboot/demo",
        "/toplayer",
        "console=ttyS0 layerboot.rescue_timeout=0",
    );
    deploy(
        "layerboot/demo:v2",
        "/toplayer-bad",
        "console=ttyS0 layerboot.rescue_timeout=0 layerboot.bless_timeout=150",
    );
    let disk = dir.join("disk.img");
    gpt_disk_with_esp_tree(&disk, &store, &esp, Loader::SystemdBoot);
    fs::remove_file(&store).unwrap();

    let boot = |n: u32| {
        let console = Qemu {
            timeout: Duration::from_secs(600),
            uefi: true,
            ..Qemu::new(vec![disk.clone()], String::new(), dir.join(format!("boot{n}.log")))
        }
        .run();
        no_panic(&console);
        console
    };
    let stuck = boot(1);
    assert!(
        stuck.contains("emergency mode"),
        "the bad deployment reached emergency mode:\n{}",
        tail(&stuck, 40)
    );
    assert!(
        stuck.contains("layerboot: emergency or rescue mode: this boot is not blessed yet")
            && stuck.contains("touch /run/layerboot/deadline-stop"),
        "emergency mode names the reboot and how to stay:\n{}",
        tail(&stuck, 40)
    );
    assert!(
        stuck.contains("not blessed within layerboot.bless_timeout=150: rebooting"),
        "{}",
        tail(&stuck, 40)
    );
    assert!(rebooted(&stuck), "it rebooted on its own:\n{}", tail(&stuck, 40));

    let back = boot(2);
    let r = report(&back);
    assert_eq!(r["hostname"], "vm-deadline", "the previous deployment booted");
    assert_eq!(r["tag"], "latest");
    assert!(back.contains("layerboot: boot blessed"), "{}", tail(&back, 40));

    let after = dir.join("esp-after");
    esp_tree(&disk, &after);
    let mut entries: Vec<String> = fs::read_dir(after.join("loader/entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            format!("layerboot-000001-{}.conf", image_id12("DEMO_ID")),
            format!("layerboot-000002-{}+0-1.conf", image_id12("DEMO_V2_ID"))
        ],
        "v1 blessed, v2's one try used up"
    );
}
