//! The LEDs and buzzer: one pattern per [`Indication`], so a patient who cannot read a screen still knows
//! where they are. Green means go on, red means ask someone; the buzzer marks each change.
//!
//! | indication   | green        | red          | buzzer                    |
//! |--------------|--------------|--------------|---------------------------|
//! | `Ready`      | on           | off          | silent                    |
//! | `CheckedIn`  | on           | off          | one short beep            |
//! | `Measuring`  | blinks 1 Hz  | off          | silent                    |
//! | `ResultOk`   | on           | off          | two short beeps           |
//! | `SeeANurse`  | off          | blinks 2 Hz  | three long beeps, then red stays on |
//! | `Error`      | off          | on           | one long beep             |

use embedded_hal::digital::OutputPin;
use protocol::link::Indication;

/// The outputs at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outputs {
    /// Green LED lit.
    pub green: bool,
    /// Red LED lit.
    pub red: bool,
    /// Buzzer sounding.
    pub buzzer: bool,
}

/// One step of a pattern: these outputs for this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The outputs.
    pub outputs: Outputs,
    /// For how long, in milliseconds.
    pub ms: u16,
}

const fn step(green: bool, red: bool, buzzer: bool, ms: u16) -> Step {
    Step {
        outputs: Outputs { green, red, buzzer },
        ms,
    }
}

/// A pattern: its steps, then either repeated or its last step held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// The steps, in order.
    pub steps: &'static [Step],
    /// Whether the steps repeat (otherwise the last one holds).
    pub repeat: bool,
}

/// The pattern of each indication (the table in the module doc).
pub fn pattern(indication: Indication) -> Pattern {
    const BEEP: u16 = 120;
    const LONG: u16 = 600;
    match indication {
        Indication::Ready => Pattern {
            steps: {
                const STEPS: &[Step] = &[step(true, false, false, 1)];
                STEPS
            },
            repeat: false,
        },
        Indication::CheckedIn => Pattern {
            steps: {
                const STEPS: &[Step] =
                    &[step(true, false, true, BEEP), step(true, false, false, 1)];
                STEPS
            },
            repeat: false,
        },
        Indication::Measuring => Pattern {
            steps: {
                const STEPS: &[Step] = &[
                    step(true, false, false, 500),
                    step(false, false, false, 500),
                ];
                STEPS
            },
            repeat: true,
        },
        Indication::ResultOk => Pattern {
            steps: {
                const STEPS: &[Step] = &[
                    step(true, false, true, BEEP),
                    step(true, false, false, BEEP),
                    step(true, false, true, BEEP),
                    step(true, false, false, 1),
                ];
                STEPS
            },
            repeat: false,
        },
        Indication::SeeANurse => Pattern {
            steps: {
                const STEPS: &[Step] = &[
                    step(false, true, true, LONG),
                    step(false, false, false, 250),
                    step(false, true, true, LONG),
                    step(false, false, false, 250),
                    step(false, true, true, LONG),
                    step(false, false, false, 250),
                    step(false, true, false, 250),
                    step(false, false, false, 250),
                    step(false, true, false, 250),
                    step(false, false, false, 250),
                    step(false, true, false, 1),
                ];
                STEPS
            },
            repeat: false,
        },
        Indication::Error => Pattern {
            steps: {
                const STEPS: &[Step] =
                    &[step(false, true, true, LONG), step(false, true, false, 1)];
                STEPS
            },
            repeat: false,
        },
    }
}

impl Pattern {
    /// The outputs `elapsed_ms` after the pattern started.
    pub fn at(&self, elapsed_ms: u64) -> Outputs {
        let total: u64 = self.steps.iter().map(|s| u64::from(s.ms)).sum();
        let mut t = if self.repeat && total > 0 {
            elapsed_ms % total
        } else {
            elapsed_ms
        };
        for s in self.steps {
            if t < u64::from(s.ms) {
                return s.outputs;
            }
            t -= u64::from(s.ms);
        }
        self.steps.last().map_or(
            Outputs {
                green: false,
                red: false,
                buzzer: false,
            },
            |s| s.outputs,
        )
    }
}

/// Drives the three outputs through the current pattern.
#[derive(Debug)]
pub struct Indicator<G, R, B> {
    green: G,
    red: R,
    buzzer: B,
    showing: Indication,
    since_ms: u64,
}

impl<G: OutputPin, R: OutputPin, B: OutputPin> Indicator<G, R, B> {
    /// Starts showing `Ready`.
    pub fn new(green: G, red: R, buzzer: B, now_ms: u64) -> Self {
        let mut indicator = Self {
            green,
            red,
            buzzer,
            showing: Indication::Ready,
            since_ms: now_ms,
        };
        indicator.tick(now_ms);
        indicator
    }

    /// Shows `indication` from `now_ms` (restarting it if it is already showing: a repeated `Show` is a
    /// new event, and its beep is what the patient waits for).
    pub fn show(&mut self, indication: Indication, now_ms: u64) {
        self.showing = indication;
        self.since_ms = now_ms;
        self.tick(now_ms);
    }

    /// What is showing.
    pub fn showing(&self) -> Indication {
        self.showing
    }

    /// Sets the outputs for `now_ms`. GPIO errors are ignored: the board's pins cannot fail, and a
    /// failing LED must not stop check-ins.
    pub fn tick(&mut self, now_ms: u64) {
        let o = pattern(self.showing).at(now_ms.saturating_sub(self.since_ms));
        let _ = self.green.set_state(o.green.into());
        let _ = self.red.set_state(o.red.into());
        let _ = self.buzzer.set_state(o.buzzer.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakePin;
    use core::cell::Cell;

    /// Samples the three pins every 10 ms for `ms` after showing `indication`.
    fn trace(indication: Indication, ms: u64) -> Vec<(bool, bool, bool)> {
        let (g, r, b) = (Cell::new(false), Cell::new(false), Cell::new(false));
        let mut ind = Indicator::new(FakePin(&g), FakePin(&r), FakePin(&b), 0);
        ind.show(indication, 1000);
        (0..ms / 10)
            .map(|i| {
                ind.tick(1000 + i * 10);
                (g.get(), r.get(), b.get())
            })
            .collect()
    }

    /// Runs of equal samples: (green, red, buzzer, how many 10 ms samples).
    fn runs(t: &[(bool, bool, bool)]) -> Vec<(bool, bool, bool, usize)> {
        let mut out: Vec<(bool, bool, bool, usize)> = Vec::new();
        for &(g, r, b) in t {
            match out.last_mut() {
                Some(last) if (last.0, last.1, last.2) == (g, r, b) => last.3 += 1,
                _ => out.push((g, r, b, 1)),
            }
        }
        out
    }

    fn beeps(t: &[(bool, bool, bool)]) -> usize {
        runs(t).iter().filter(|r| r.2).count()
    }

    #[test]
    fn ready_is_steady_green_and_silent() {
        assert_eq!(
            runs(&trace(Indication::Ready, 3000)),
            [(true, false, false, 300)]
        );
    }

    #[test]
    fn checked_in_beeps_once_and_stays_green() {
        let t = trace(Indication::CheckedIn, 3000);
        assert_eq!(beeps(&t), 1);
        assert!(t.iter().all(|s| s.0 && !s.1));
        assert_eq!(*t.last().unwrap(), (true, false, false));
    }

    #[test]
    fn measuring_blinks_green_at_1_hz_silently() {
        let r = runs(&trace(Indication::Measuring, 3000));
        assert_eq!(r.len(), 6, "{r:?}");
        assert!(r.iter().all(|x| !x.1 && !x.2 && x.3 == 50));
    }

    #[test]
    fn result_ok_beeps_twice_and_stays_green() {
        let t = trace(Indication::ResultOk, 3000);
        assert_eq!(beeps(&t), 2);
        assert!(t.iter().all(|s| s.0 && !s.1));
    }

    #[test]
    fn see_a_nurse_is_red_with_three_long_beeps_then_steady_red() {
        let t = trace(Indication::SeeANurse, 6000);
        assert_eq!(beeps(&t), 3);
        assert!(
            runs(&t).iter().filter(|r| r.2).all(|r| r.3 == 60),
            "long beeps"
        );
        assert!(t.iter().all(|s| !s.0), "never green");
        assert_eq!(*t.last().unwrap(), (false, true, false));
    }

    #[test]
    fn error_is_steady_red_with_one_long_beep() {
        let t = trace(Indication::Error, 3000);
        assert_eq!(
            runs(&t),
            [(false, true, true, 60), (false, true, false, 240)]
        );
    }

    #[test]
    fn every_indication_looks_different() {
        let all = [
            Indication::Ready,
            Indication::CheckedIn,
            Indication::Measuring,
            Indication::ResultOk,
            Indication::SeeANurse,
            Indication::Error,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(trace(*a, 6000), trace(*b, 6000), "{a:?} vs {b:?}");
            }
        }
    }
}
