//! Boot counting as the UAPI.1 Boot Loader Specification defines it and systemd-boot
//! does it: a type 1 entry `ID+LEFT[-DONE].conf` has LEFT tries left and DONE used; the
//! loader renames it before each try, and a boot that is good renames it to `ID.conf`.
//! Shared by /init (which blesses the running entry) and the builder (which writes and
//! lists the entries of deployments).

/// What the loader's counter in an entry's file name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assessment {
    /// No counter: blessed (or written without counting).
    Good,
    /// `+LEFT-DONE` with tries left: being tried.
    Trying { left: u32, done: u32 },
    /// `+0-DONE`: every try used up without a blessing, or marked bad.
    Bad { done: u32 },
}

/// An entry's file name split into its id (the part without counter) and its counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryName {
    pub id: String,
    pub assessment: Assessment,
}

impl EntryName {
    /// Parses `ID.conf`, `ID+LEFT.conf` or `ID+LEFT-DONE.conf`; anything else is not an entry.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name.strip_suffix(".conf")?;
        let Some((id, counter)) = stem.rsplit_once('+') else {
            return Some(EntryName {
                id: stem.to_string(),
                assessment: Assessment::Good,
            });
        };
        let (left, done) = match counter.split_once('-') {
            Some((l, d)) => (l, d),
            None => (counter, "0"),
        };
        let number = |s: &str| -> Option<u32> {
            // Digits only: `+` or a sign in the counter is not the loader's.
            s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten()
        };
        let (left, done) = (number(left)?, number(done)?);
        let assessment = if left == 0 {
            Assessment::Bad { done }
        } else {
            Assessment::Trying { left, done }
        };
        Some(EntryName {
            id: id.to_string(),
            assessment,
        })
    }

    pub fn file_name(&self) -> String {
        match self.assessment {
            Assessment::Good => format!("{}.conf", self.id),
            Assessment::Trying { left, done: 0 } => format!("{}+{left}.conf", self.id),
            Assessment::Trying { left, done } => format!("{}+{left}-{done}.conf", self.id),
            Assessment::Bad { done: 0 } => format!("{}+0.conf", self.id),
            Assessment::Bad { done } => format!("{}+0-{done}.conf", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_in_file_names_read_as_the_loader_writes_them() {
        let cases = [
            ("layerboot-000001-abc.conf", "layerboot-000001-abc", Assessment::Good),
            (
                "layerboot-000002-abc+3.conf",
                "layerboot-000002-abc",
                Assessment::Trying { left: 3, done: 0 },
            ),
            (
                "layerboot-000002-abc+2-1.conf",
                "layerboot-000002-abc",
                Assessment::Trying { left: 2, done: 1 },
            ),
            ("x+0-3.conf", "x", Assessment::Bad { done: 3 }),
            ("x+0.conf", "x", Assessment::Bad { done: 0 }),
        ];
        for (name, id, assessment) in cases {
            let e = EntryName::parse(name).unwrap();
            assert_eq!((e.id.as_str(), e.assessment), (id, assessment), "{name}");
            assert_eq!(e.file_name(), name, "round trip");
        }
        for bad in [
            "x.txt",
            "x+.conf",
            "x+a-1.conf",
            "x+1-.conf",
            "x+-1.conf",
            "x+1-2-3.conf",
        ] {
            assert_eq!(EntryName::parse(bad), None, "{bad}");
        }
    }
}
