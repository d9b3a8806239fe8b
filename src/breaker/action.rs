//! The operator actions of the admin port (`POST /breakers/<name>/<action>`), by name: the
//! same names travel to the fleet when an action is applied fleet-wide.

use std::fmt;
use std::str::FromStr;

use super::Mode;
use super::machine::Transition;
use super::shared::SharedBreaker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    SetMode(Mode),
    Reset,
}

impl Action {
    pub const NAMES: &'static str =
        "force-open, force-closed, disabled, metrics-only, normal or reset";

    pub fn as_str(self) -> &'static str {
        match self {
            Action::SetMode(Mode::ForceOpen) => "force-open",
            Action::SetMode(Mode::ForceClosed) => "force-closed",
            Action::SetMode(Mode::Disabled) => "disabled",
            Action::SetMode(Mode::MetricsOnly) => "metrics-only",
            Action::SetMode(Mode::Normal) => "normal",
            Action::Reset => "reset",
        }
    }

    pub fn apply(self, b: &SharedBreaker) -> Option<Transition> {
        match self {
            Action::SetMode(m) => b.set_mode(m),
            Action::Reset => b.reset(),
        }
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "force-open" => Action::SetMode(Mode::ForceOpen),
            "force-closed" => Action::SetMode(Mode::ForceClosed),
            "disabled" => Action::SetMode(Mode::Disabled),
            "metrics-only" => Action::SetMode(Mode::MetricsOnly),
            "normal" => Action::SetMode(Mode::Normal),
            "reset" => Action::Reset,
            other => {
                return Err(format!("unknown action '{other}': use {}", Action::NAMES));
            }
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "force-open",
            "force-closed",
            "disabled",
            "metrics-only",
            "normal",
            "reset",
        ] {
            assert_eq!(name.parse::<Action>().unwrap().as_str(), name);
        }
        assert!("open".parse::<Action>().unwrap_err().contains("force-open"));
    }
}
