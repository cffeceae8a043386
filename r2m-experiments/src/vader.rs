//! VADER sentiment: a faithful Rust port of the Python package `vaderSentiment` 3.3.2.
//!
//! VADER (Valence Aware Dictionary and sEntiment Reasoner) is the lexicon- and
//! rule-based sentiment analyser of C.J. Hutto and E.E. Gilbert:
//!
//! > Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for
//! > Sentiment Analysis of Social Media Text. Eighth International Conference on
//! > Weblogs and Social Media (ICWSM-14). Ann Arbor, MI, June 2014.
//!
//! The original is MIT-licensed, Copyright (c) 2016 C.J. Hutto; its licence and its two
//! lexicons (`vader_lexicon.txt`, `emoji_utf8_lexicon.txt`, copied byte for byte) live in
//! `r2m-rl/assets/vader/` and are embedded with `include_str!`, parsed once on first use.
//!
//! The public API is [`polarity_scores`] (the `neg`/`neu`/`pos`/`compound` dictionary of
//! `SentimentIntensityAnalyzer().polarity_scores(text)`) and the shortcut [`compound`].
//!
//! # Porting notes
//!
//! The code follows `vaderSentiment.py` function by function, with the same names (the
//! private helpers drop Python's leading underscore: `_but_check` is `but_check` here), so
//! the two can be read side by side. Its quirks are kept on purpose, for example:
//!
//! - `_but_check` finds each sentiment again with `list.index`, i.e. it rescales the *first*
//!   element equal to it, not the element itself (see `but_check`);
//! - lexicon entries written with capitals (`:D`, `O_o`) can never match, because every
//!   lookup lower-cases the token first;
//! - only emoji that are a single code point are replaced, because Python iterates over the
//!   characters of the text and looks each one up alone;
//! - the third look-back of `_negation_check` multiplies by 1.25 whenever the word just
//!   before the lexicon word is "so" or "this" (`a and (b or c) or (d or e)` precedence);
//! - an emoji description gets a space before it but none after (`"😁x"` scores the token
//!   `eyesx`), and so on.
//!
//! Python's `str` semantics are reproduced where they matter: `str.split()`/`str.strip()`
//! use Python's notion of whitespace (`py_isspace`), `strip(string.punctuation)` strips
//! ASCII punctuation, `str.isupper()` is `py_isupper`, and the final `round(x, n)` is
//! `py_round` (round-half-even on the exact binary value, as CPython does).
//!
//! Deviation: character properties come from Rust's Unicode tables, while CPython 3.11 uses
//! Unicode 14.0. Whitespace and lower-case mappings agree on every character assigned in
//! 14.0; the `Lowercase` property (so `isupper()`) differs only for U+0295, U+10FC,
//! U+A7F2..U+A7F4 and U+AB69, whose properties changed later, and for characters assigned
//! after 14.0.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

// ##Constants##

/// (empirically derived mean sentiment intensity rating increase for booster words)
const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;

/// (empirically derived mean sentiment intensity rating increase for using ALLCAPs to
/// emphasize a word)
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;

/// Normalisation constant of [`normalize`] (Python's default `alpha=15`).
const ALPHA: f64 = 15.0;

#[rustfmt::skip]
const NEGATE: &[&str] = &[
    "aint", "arent", "cannot", "cant", "couldnt", "darent", "didnt", "doesnt",
    "ain't", "aren't", "can't", "couldn't", "daren't", "didn't", "doesn't",
    "dont", "hadnt", "hasnt", "havent", "isnt", "mightnt", "mustnt", "neither",
    "don't", "hadn't", "hasn't", "haven't", "isn't", "mightn't", "mustn't",
    "neednt", "needn't", "never", "none", "nope", "nor", "not", "nothing", "nowhere",
    "oughtnt", "shant", "shouldnt", "uhuh", "wasnt", "werent",
    "oughtn't", "shan't", "shouldn't", "uh-uh", "wasn't", "weren't",
    "without", "wont", "wouldnt", "won't", "wouldn't", "rarely", "seldom", "despite",
];

/// booster/dampener 'intensifiers' or 'degree adverbs'
/// <http://en.wiktionary.org/wiki/Category:English_degree_adverbs>
const BOOSTER_DICT: &[(&str, f64)] = &[
    ("absolutely", B_INCR),
    ("amazingly", B_INCR),
    ("awfully", B_INCR),
    ("completely", B_INCR),
    ("considerable", B_INCR),
    ("considerably", B_INCR),
    ("decidedly", B_INCR),
    ("deeply", B_INCR),
    ("effing", B_INCR),
    ("enormous", B_INCR),
    ("enormously", B_INCR),
    ("entirely", B_INCR),
    ("especially", B_INCR),
    ("exceptional", B_INCR),
    ("exceptionally", B_INCR),
    ("extreme", B_INCR),
    ("extremely", B_INCR),
    ("fabulously", B_INCR),
    ("flipping", B_INCR),
    ("flippin", B_INCR),
    ("frackin", B_INCR),
    ("fracking", B_INCR),
    ("fricking", B_INCR),
    ("frickin", B_INCR),
    ("frigging", B_INCR),
    ("friggin", B_INCR),
    ("fully", B_INCR),
    ("fuckin", B_INCR),
    ("fucking", B_INCR),
    ("fuggin", B_INCR),
    ("fugging", B_INCR),
    ("greatly", B_INCR),
    ("hella", B_INCR),
    ("highly", B_INCR),
    ("hugely", B_INCR),
    ("incredible", B_INCR),
    ("incredibly", B_INCR),
    ("intensely", B_INCR),
    ("major", B_INCR),
    ("majorly", B_INCR),
    ("more", B_INCR),
    ("most", B_INCR),
    ("particularly", B_INCR),
    ("purely", B_INCR),
    ("quite", B_INCR),
    ("really", B_INCR),
    ("remarkably", B_INCR),
    ("so", B_INCR),
    ("substantially", B_INCR),
    ("thoroughly", B_INCR),
    ("total", B_INCR),
    ("totally", B_INCR),
    ("tremendous", B_INCR),
    ("tremendously", B_INCR),
    ("uber", B_INCR),
    ("unbelievably", B_INCR),
    ("unusually", B_INCR),
    ("utter", B_INCR),
    ("utterly", B_INCR),
    ("very", B_INCR),
    ("almost", B_DECR),
    ("barely", B_DECR),
    ("hardly", B_DECR),
    ("just enough", B_DECR),
    ("kind of", B_DECR),
    ("kinda", B_DECR),
    ("kindof", B_DECR),
    ("kind-of", B_DECR),
    ("less", B_DECR),
    ("little", B_DECR),
    ("marginal", B_DECR),
    ("marginally", B_DECR),
    ("occasional", B_DECR),
    ("occasionally", B_DECR),
    ("partly", B_DECR),
    ("scarce", B_DECR),
    ("scarcely", B_DECR),
    ("slight", B_DECR),
    ("slightly", B_DECR),
    ("somewhat", B_DECR),
    ("sort of", B_DECR),
    ("sorta", B_DECR),
    ("sortof", B_DECR),
    ("sort-of", B_DECR),
];

// SENTIMENT_LADEN_IDIOMS and `_sentiment_laden_idioms_check` are "future work, not yet
// implemented" in 3.3.2 (never called), so they are not ported.

/// check for special case idioms and phrases containing lexicon words
const SPECIAL_CASES: &[(&str, f64)] = &[
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

const VADER_LEXICON: &str = include_str!("../assets/vader/vader_lexicon.txt");
const EMOJI_LEXICON: &str = include_str!("../assets/vader/emoji_utf8_lexicon.txt");

/// The sentiment of a text, as returned by VADER's `polarity_scores`.
///
/// `neg`, `neu` and `pos` are the proportions of the text that fall in each category (they
/// sum to about 1; all three are 0 for a text without words) and are rounded to 3 decimals;
/// `compound` is the normalised, weighted composite score in [-1, 1], rounded to 4 decimals.
/// The rounding is Python's `round` (see `py_round`), so the values are the same doubles as
/// the Python package's.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolarityScores {
    /// Proportion of negative sentiment.
    pub neg: f64,
    /// Proportion of neutral words.
    pub neu: f64,
    /// Proportion of positive sentiment.
    pub pos: f64,
    /// Normalised composite score in [-1, 1] (-1 most negative, +1 most positive).
    pub compound: f64,
}

/// VADER's `SentimentIntensityAnalyzer().polarity_scores(text)`.
///
/// The lexicons are parsed on the first call (a few milliseconds); later calls only score.
#[must_use]
pub fn polarity_scores(text: &str) -> PolarityScores {
    SentimentIntensityAnalyzer::get().polarity_scores(text)
}

/// The `compound` score of [`polarity_scores`]: in [-1, 1], rounded to 4 decimals.
#[must_use]
pub fn compound(text: &str) -> f64 {
    polarity_scores(text).compound
}

// #Python str semantics# #

/// Python's `str.isspace()` for one character: Rust's `White_Space` plus U+001C..U+001F
/// (which CPython counts as whitespace through their bidirectional class).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` (no argument).
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `str.split()` (no argument): runs of whitespace separate, no empty pieces.
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|w| !w.is_empty())
}

/// Python's `str.lower()` (full Unicode lower-casing, final sigma included); borrows when
/// the text is ASCII without capitals, the common case.
fn py_lower(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(s.to_ascii_lowercase())
        } else {
            Cow::Borrowed(s)
        }
    } else {
        Cow::Owned(s.to_lowercase())
    }
}

/// Whether `c` is a titlecase letter (general category `Lt`); these 31 characters have
/// been the whole category since Unicode 4.
fn is_titlecase(c: char) -> bool {
    matches!(
        c,
        '\u{1C5}'
            | '\u{1C8}'
            | '\u{1CB}'
            | '\u{1F2}'
            | '\u{1F88}'..='\u{1F8F}'
            | '\u{1F98}'..='\u{1F9F}'
            | '\u{1FA8}'..='\u{1FAF}'
            | '\u{1FBC}'
            | '\u{1FCC}'
            | '\u{1FFC}'
    )
}

/// Python's `str.isupper()`: no lowercase or titlecase character and at least one uppercase
/// one (so `"A1!"` is upper while `"123"` and `":)"` are not).
fn py_isupper(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_lowercase() || is_titlecase(c) {
            return false;
        }
        if !cased && c.is_uppercase() {
            cased = true;
        }
    }
    cased
}

/// Python's `round(x, ndigits)` for a float.
///
/// CPython rounds the *exact* binary value of `x` to `ndigits` decimals, breaking exact ties
/// to even (`round(0.03125, 4) == 0.0312`, `round(0.0625, 3) == 0.062`), and parses the
/// decimal string back. Rust's `{:.N}` formatting is also exact and ties to even, so
/// format-then-parse gives the same double. (Rounding `x * 10^n` with `f64::round` would not:
/// it rounds ties away from zero and the product is itself inexact.)
fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.ndigits$}")
        .parse()
        .expect("a formatted finite f64 parses back")
}

// #Static methods# #

/// Determine if input contains negation words
fn negated(input_words: &[&str], include_nt: bool) -> bool {
    // Python: `for word in NEGATE: if word in input_words: return True`, as a set lookup.
    if input_words.iter().any(|w| negate().contains(&*py_lower(w))) {
        return true;
    }
    if include_nt {
        for word in input_words {
            if py_lower(word).contains("n't") {
                return true;
            }
        }
    }
    false
}

/// Normalize the score to be between -1 and 1 using an alpha that approximates the max
/// expected value
fn normalize(score: f64, alpha: f64) -> f64 {
    let norm_score = score / ((score * score) + alpha).sqrt();
    norm_score.clamp(-1.0, 1.0)
}

/// Check whether just some words in the input are ALL CAPS: `true` if some but not all
/// items in `words` are ALL CAPS
fn allcap_differential(words: &[&str]) -> bool {
    let allcap_words = words.iter().filter(|w| py_isupper(w)).count();
    let cap_differential = words.len() - allcap_words;
    0 < cap_differential && cap_differential < words.len()
}

/// Check if the preceding words increase, decrease, or negate/nullify the valence
fn scalar_inc_dec(word: &str, valence: f64, is_cap_diff: bool) -> f64 {
    let mut scalar = 0.0;
    let word_lower = py_lower(word);
    if let Some(&booster) = booster_dict().get(&*word_lower) {
        scalar = booster;
        if valence < 0.0 {
            scalar *= -1.0;
        }
        // check if booster/dampener word is in ALLCAPS (while others aren't)
        if py_isupper(word) && is_cap_diff {
            if valence > 0.0 {
                scalar += C_INCR;
            } else {
                scalar -= C_INCR;
            }
        }
    }
    scalar
}

/// `NEGATE` as a set (built once).
fn negate() -> &'static FastSet<&'static str> {
    static SET: OnceLock<FastSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| NEGATE.iter().copied().collect())
}

/// `BOOSTER_DICT` as a map (built once).
fn booster_dict() -> &'static FastMap<&'static str, f64> {
    static MAP: OnceLock<FastMap<&'static str, f64>> = OnceLock::new();
    MAP.get_or_init(|| BOOSTER_DICT.iter().copied().collect())
}

/// `SPECIAL_CASES` as a map (built once).
fn special_cases() -> &'static FastMap<&'static str, f64> {
    static MAP: OnceLock<FastMap<&'static str, f64>> = OnceLock::new();
    MAP.get_or_init(|| SPECIAL_CASES.iter().copied().collect())
}

/// The Fx hash (rustc's): the maps here are fixed word lists looked up with short keys, for
/// which std's DoS-resistant SipHash is several times slower.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

/// Identify sentiment-relevant string-level properties of input text.
struct SentiText<'a> {
    /// The tokens: whitespace-split, with leading and trailing punctuation removed unless
    /// that would leave at most two characters (emoticons and contractions are kept).
    words_and_emoticons: Vec<&'a str>,
    /// `words_and_emoticons` lower-cased once (the Python helpers lower-case the whole list
    /// again on every call, which is what made them quadratic).
    words_and_emoticons_lower: Vec<Cow<'a, str>>,
    is_cap_diff: bool,
}

impl<'a> SentiText<'a> {
    fn new(text: &'a str) -> Self {
        let words_and_emoticons = Self::words_and_emoticons(text);
        let words_and_emoticons_lower = words_and_emoticons.iter().map(|w| py_lower(w)).collect();
        // doesn't separate words from adjacent punctuation (keeps emoticons & contractions)
        let is_cap_diff = allcap_differential(&words_and_emoticons);
        Self {
            words_and_emoticons,
            words_and_emoticons_lower,
            is_cap_diff,
        }
    }

    /// Removes all trailing and leading punctuation. If the resulting string has two or fewer
    /// characters, then it was likely an emoticon, so return original string (ie ":)"
    /// stripped would be "", so just return ":)")
    fn strip_punc_if_word(token: &str) -> &str {
        // `string.punctuation` is exactly the ASCII punctuation characters.
        let stripped = token.trim_matches(|c: char| c.is_ascii_punctuation());
        // Python's `len` counts code points.
        if stripped.chars().count() <= 2 {
            return token;
        }
        stripped
    }

    /// Removes leading and trailing puncutation. Leaves contractions and most emoticons. Does
    /// not preserve punc-plus-letter emoticons (e.g. :D)
    fn words_and_emoticons(text: &str) -> Vec<&str> {
        py_split(text).map(Self::strip_punc_if_word).collect()
    }
}

/// Give a sentiment intensity score to sentences.
struct SentimentIntensityAnalyzer {
    lexicon: FastMap<&'static str, f64>,
    emojis: FastMap<&'static str, &'static str>,
}

impl SentimentIntensityAnalyzer {
    /// The analyser over the embedded lexicons, built on first use.
    fn get() -> &'static Self {
        static ANALYZER: OnceLock<SentimentIntensityAnalyzer> = OnceLock::new();
        ANALYZER.get_or_init(|| Self::new(VADER_LEXICON, EMOJI_LEXICON))
    }

    fn new(lexicon_file: &'static str, emoji_lexicon: &'static str) -> Self {
        Self {
            lexicon: Self::make_lex_dict(lexicon_file),
            emojis: Self::make_emoji_dict(emoji_lexicon),
        }
    }

    /// Convert lexicon file to a dictionary
    fn make_lex_dict(lexicon_file: &'static str) -> FastMap<&'static str, f64> {
        let mut lex_dict = FastMap::default();
        for line in lexicon_file.trim_end_matches('\n').split('\n') {
            if line.is_empty() {
                continue;
            }
            let mut fields = py_strip(line).split('\t');
            let word = fields.next().unwrap_or_default();
            let measure = fields
                .next()
                .unwrap_or_else(|| panic!("vader lexicon line without a tab: {line:?}"));
            let measure: f64 = measure
                .parse()
                .unwrap_or_else(|_| panic!("vader lexicon: bad measure in {line:?}"));
            lex_dict.insert(word, measure);
        }
        lex_dict
    }

    /// Convert emoji lexicon file to a dictionary
    fn make_emoji_dict(emoji_lexicon: &'static str) -> FastMap<&'static str, &'static str> {
        let mut emoji_dict = FastMap::default();
        for line in emoji_lexicon.trim_end_matches('\n').split('\n') {
            let mut fields = py_strip(line).split('\t');
            let emoji = fields.next().unwrap_or_default();
            let description = fields
                .next()
                .unwrap_or_else(|| panic!("vader emoji lexicon line without a tab: {line:?}"));
            emoji_dict.insert(emoji, description);
        }
        emoji_dict
    }

    /// Return a float for sentiment strength based on the input text. Positive values are
    /// positive valence, negative value are negative valence.
    fn polarity_scores(&self, text: &str) -> PolarityScores {
        // convert emojis to their textual descriptions
        let mut text_no_emoji = String::with_capacity(text.len());
        let mut prev_space = true;
        let mut buf = [0u8; 4];
        for chr in text.chars() {
            // Python looks each single character up, so only one-code-point emoji match.
            // The emoji lexicon has no ASCII key (a test checks), so ASCII skips the lookup.
            let description = if chr.is_ascii() {
                None
            } else {
                self.emojis.get(&*chr.encode_utf8(&mut buf))
            };
            if let Some(description) = description {
                // get the textual description
                if !prev_space {
                    text_no_emoji.push(' ');
                }
                text_no_emoji.push_str(description);
                prev_space = false;
            } else {
                text_no_emoji.push(chr);
                prev_space = chr == ' ';
            }
        }
        let text = py_strip(&text_no_emoji);

        let sentitext = SentiText::new(text);

        let words_and_emoticons = &sentitext.words_and_emoticons;
        let words_and_emoticons_lower = &sentitext.words_and_emoticons_lower;
        let mut sentiments: Vec<f64> = Vec::with_capacity(words_and_emoticons.len());
        for (i, item) in words_and_emoticons.iter().enumerate() {
            let valence = 0.0;
            // check for vader_lexicon words that may be used as modifiers or negations
            let item_lower = &*words_and_emoticons_lower[i];
            if booster_dict().contains_key(item_lower) {
                sentiments.push(valence);
                continue;
            }
            if i < words_and_emoticons.len() - 1
                && item_lower == "kind"
                && words_and_emoticons_lower[i + 1] == "of"
            {
                sentiments.push(valence);
                continue;
            }

            self.sentiment_valence(valence, &sentitext, item, i, &mut sentiments);
        }

        let sentiments = but_check(words_and_emoticons_lower, sentiments);

        score_valence(&sentiments, text)
    }

    fn sentiment_valence(
        &self,
        mut valence: f64,
        sentitext: &SentiText<'_>,
        item: &str,
        i: usize,
        sentiments: &mut Vec<f64>,
    ) {
        let is_cap_diff = sentitext.is_cap_diff;
        let words_and_emoticons = &sentitext.words_and_emoticons;
        let words_and_emoticons_lower = &sentitext.words_and_emoticons_lower;
        let item_lowercase = &*words_and_emoticons_lower[i];
        if let Some(&item_valence) = self.lexicon.get(item_lowercase) {
            // get the sentiment valence
            valence = item_valence;

            // check for "no" as negation for an adjacent lexicon item vs "no" as its own
            // stand-alone lexicon item
            if item_lowercase == "no"
                && i != words_and_emoticons.len() - 1
                && self.in_lexicon(&words_and_emoticons_lower[i + 1])
            {
                // don't use valence of "no" as a lexicon item. Instead set it's valence to 0.0
                // and negate the next item
                valence = 0.0;
            }
            if (i > 0 && words_and_emoticons_lower[i - 1] == "no")
                || (i > 1 && words_and_emoticons_lower[i - 2] == "no")
                || (i > 2
                    && words_and_emoticons_lower[i - 3] == "no"
                    && ["or", "nor"].contains(&&*words_and_emoticons_lower[i - 1]))
            {
                valence = item_valence * N_SCALAR;
            }

            // check if sentiment laden word is in ALL CAPS (while others aren't)
            if py_isupper(item) && is_cap_diff {
                if valence > 0.0 {
                    valence += C_INCR;
                } else {
                    valence -= C_INCR;
                }
            }

            for start_i in 0..3 {
                // dampen the scalar modifier of preceding words and emoticons (excluding the
                // ones that immediately preceed the item) based on their distance from the
                // current item.
                if i > start_i && !self.in_lexicon(&words_and_emoticons_lower[i - (start_i + 1)]) {
                    let mut s = scalar_inc_dec(
                        words_and_emoticons[i - (start_i + 1)],
                        valence,
                        is_cap_diff,
                    );
                    if start_i == 1 && s != 0.0 {
                        s *= 0.95;
                    }
                    if start_i == 2 && s != 0.0 {
                        s *= 0.9;
                    }
                    valence += s;
                    valence = negation_check(valence, words_and_emoticons_lower, start_i, i);
                    if start_i == 2 {
                        valence = special_idioms_check(valence, words_and_emoticons_lower, i);
                    }
                }
            }

            valence = self.least_check(valence, words_and_emoticons_lower, i);
        }
        sentiments.push(valence);
    }

    fn in_lexicon(&self, word_lower: &str) -> bool {
        self.lexicon.contains_key(word_lower)
    }

    /// Python: `_least_check`.
    fn least_check(
        &self,
        mut valence: f64,
        words_and_emoticons_lower: &[Cow<'_, str>],
        i: usize,
    ) -> f64 {
        let w = words_and_emoticons_lower;
        // check for negation case using "least"
        if i > 1 && !self.in_lexicon(&w[i - 1]) && w[i - 1] == "least" {
            if w[i - 2] != "at" && w[i - 2] != "very" {
                valence *= N_SCALAR;
            }
        } else if i > 0 && !self.in_lexicon(&w[i - 1]) && w[i - 1] == "least" {
            valence *= N_SCALAR;
        }
        valence
    }
}

/// Python: `_but_check`, check for modification in sentiment due to contrastive
/// conjunction 'but'.
///
/// Python loops `for sentiment in sentiments:` and locates each one with
/// `si = sentiments.index(sentiment)`, the index of the *first* element equal to it in the
/// list as modified so far (so, with several equal scores, the first copy is rescaled again
/// and later copies keep their value; `0 == 0.0 == -0.0`). It then halves it if `si` is
/// before the first 'but', multiplies it by 1.5 if after, and leaves it if `si` is the 'but'
/// itself. This reproduces that exactly, with a min-heap of indices per value instead of
/// Python's linear `index` scan, so it is O(n log n) rather than quadratic.
fn but_check(words_and_emoticons_lower: &[Cow<'_, str>], mut sentiments: Vec<f64>) -> Vec<f64> {
    let Some(bi) = words_and_emoticons_lower.iter().position(|w| w == "but") else {
        return sentiments;
    };
    // Key of a value under Python's float `==` (finite values; -0.0 + 0.0 == +0.0).
    let key = |x: f64| (x + 0.0).to_bits();
    let mut positions: FastMap<u64, BinaryHeap<Reverse<usize>>> = FastMap::default();
    for (idx, &s) in sentiments.iter().enumerate() {
        positions.entry(key(s)).or_default().push(Reverse(idx));
    }
    for k in 0..sentiments.len() {
        // Element k is still unmodified here: iteration j only ever rewrites an index <= j.
        let sentiment = sentiments[k];
        let same = positions
            .get_mut(&key(sentiment))
            .expect("every current value is indexed");
        let Reverse(si) = *same.peek().expect("the value occurs at k at least");
        let new = match si.cmp(&bi) {
            std::cmp::Ordering::Less => sentiment * 0.5,
            std::cmp::Ordering::Greater => sentiment * 1.5,
            std::cmp::Ordering::Equal => continue,
        };
        if key(new) != key(sentiment) {
            same.pop();
            positions.entry(key(new)).or_default().push(Reverse(si));
        }
        sentiments[si] = new;
    }
    sentiments
}

/// `" ".join(words)` (Python builds these n-grams with `"{0} {1}".format(...)`).
fn join(words: &[&str]) -> String {
    let mut joined = String::with_capacity(words.iter().map(|w| w.len() + 1).sum());
    for (k, word) in words.iter().enumerate() {
        if k > 0 {
            joined.push(' ');
        }
        joined.push_str(word);
    }
    joined
}

/// Python: `_special_idioms_check` (only called with `i >= 3`).
fn special_idioms_check(
    mut valence: f64,
    words_and_emoticons_lower: &[Cow<'_, str>],
    i: usize,
) -> f64 {
    let w = words_and_emoticons_lower;
    let onezero = join(&[&w[i - 1], &w[i]]);

    let twoonezero = join(&[&w[i - 2], &w[i - 1], &w[i]]);

    let twoone = join(&[&w[i - 2], &w[i - 1]]);

    let threetwoone = join(&[&w[i - 3], &w[i - 2], &w[i - 1]]);

    let threetwo = join(&[&w[i - 3], &w[i - 2]]);

    let sequences = [&onezero, &twoonezero, &twoone, &threetwoone, &threetwo];

    for seq in sequences {
        if let Some(&special) = special_cases().get(seq.as_str()) {
            valence = special;
            break;
        }
    }

    if w.len() - 1 > i {
        let zeroone = join(&[&w[i], &w[i + 1]]);
        if let Some(&special) = special_cases().get(zeroone.as_str()) {
            valence = special;
        }
    }
    if w.len() - 1 > i + 1 {
        let zeroonetwo = join(&[&w[i], &w[i + 1], &w[i + 2]]);
        if let Some(&special) = special_cases().get(zeroonetwo.as_str()) {
            valence = special;
        }
    }

    // check for booster/dampener bi-grams such as 'sort of' or 'kind of'
    let n_grams = [&threetwoone, &threetwo, &twoone];
    for n_gram in n_grams {
        if let Some(&booster) = booster_dict().get(n_gram.as_str()) {
            valence += booster;
        }
    }
    valence
}

/// Python: `_negation_check`.
fn negation_check(
    mut valence: f64,
    words_and_emoticons_lower: &[Cow<'_, str>],
    start_i: usize,
    i: usize,
) -> f64 {
    let w = words_and_emoticons_lower;
    if start_i == 0 {
        // 1 word preceding lexicon word (w/o stopwords)
        if negated(&[&w[i - (start_i + 1)]], true) {
            valence *= N_SCALAR;
        }
    }
    if start_i == 1 {
        if w[i - 2] == "never" && (w[i - 1] == "so" || w[i - 1] == "this") {
            valence *= 1.25;
        } else if w[i - 2] == "without" && w[i - 1] == "doubt" {
            // valence = valence
        } else if negated(&[&w[i - (start_i + 1)]], true) {
            // 2 words preceding the lexicon word position
            valence *= N_SCALAR;
        }
    }
    if start_i == 2 {
        // Python: `a and (b or c) or (d or e)`, i.e. "so"/"this" just before the lexicon
        // word amplifies on its own (kept as is).
        if (w[i - 3] == "never" && (w[i - 2] == "so" || w[i - 2] == "this"))
            || (w[i - 1] == "so" || w[i - 1] == "this")
        {
            valence *= 1.25;
        } else if w[i - 3] == "without" && (w[i - 2] == "doubt" || w[i - 1] == "doubt") {
            // valence = valence
        } else if negated(&[&w[i - (start_i + 1)]], true) {
            // 3 words preceding the lexicon word position
            valence *= N_SCALAR;
        }
    }
    valence
}

/// Python: `_punctuation_emphasis`, add emphasis from exclamation points and question marks
fn punctuation_emphasis(text: &str) -> f64 {
    let ep_amplifier = amplify_ep(text);
    let qm_amplifier = amplify_qm(text);
    ep_amplifier + qm_amplifier
}

/// Python: `_amplify_ep`, check for added emphasis resulting from exclamation points (up to
/// 4 of them)
fn amplify_ep(text: &str) -> f64 {
    let ep_count = text.matches('!').count().min(4);
    // (empirically derived mean sentiment intensity rating increase for exclamation points)
    ep_count as f64 * 0.292
}

/// Python: `_amplify_qm`, check for added emphasis resulting from question marks (2 or 3+)
fn amplify_qm(text: &str) -> f64 {
    let qm_count = text.matches('?').count();
    let mut qm_amplifier = 0.0;
    if qm_count > 1 {
        if qm_count <= 3 {
            // (empirically derived mean sentiment intensity rating increase for question marks)
            qm_amplifier = qm_count as f64 * 0.18;
        } else {
            qm_amplifier = 0.96;
        }
    }
    qm_amplifier
}

/// Python: `_sift_sentiment_scores`, want separate positive versus negative sentiment scores
fn sift_sentiment_scores(sentiments: &[f64]) -> (f64, f64, usize) {
    let mut pos_sum = 0.0;
    let mut neg_sum = 0.0;
    let mut neu_count = 0;
    for &sentiment_score in sentiments {
        if sentiment_score > 0.0 {
            pos_sum += sentiment_score + 1.0; // compensates for neutral words that are counted as 1
        }
        if sentiment_score < 0.0 {
            neg_sum += sentiment_score - 1.0; // when used with math.fabs(), compensates for neutrals
        }
        if sentiment_score == 0.0 {
            neu_count += 1;
        }
    }
    (pos_sum, neg_sum, neu_count)
}

fn score_valence(sentiments: &[f64], text: &str) -> PolarityScores {
    let (compound, pos, neg, neu);
    if !sentiments.is_empty() {
        // Python's `sum` (3.11: plain left-to-right addition).
        let mut sum_s: f64 = sentiments.iter().fold(0.0, |acc, &s| acc + s);
        // compute and add emphasis from punctuation in text
        let punct_emph_amplifier = punctuation_emphasis(text);
        if sum_s > 0.0 {
            sum_s += punct_emph_amplifier;
        } else if sum_s < 0.0 {
            sum_s -= punct_emph_amplifier;
        }

        compound = normalize(sum_s, ALPHA);
        // discriminate between positive, negative and neutral sentiment scores
        let (mut pos_sum, mut neg_sum, neu_count) = sift_sentiment_scores(sentiments);

        if pos_sum > neg_sum.abs() {
            pos_sum += punct_emph_amplifier;
        } else if pos_sum < neg_sum.abs() {
            neg_sum -= punct_emph_amplifier;
        }

        let total = pos_sum + neg_sum.abs() + neu_count as f64;
        pos = (pos_sum / total).abs();
        neg = (neg_sum / total).abs();
        neu = (neu_count as f64 / total).abs();
    } else {
        compound = 0.0;
        pos = 0.0;
        neg = 0.0;
        neu = 0.0;
    }

    PolarityScores {
        neg: py_round(neg, 3),
        neu: py_round(neu, 3),
        pos: py_round(pos, 3),
        compound: py_round(compound, 4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(neg: f64, neu: f64, pos: f64, compound: f64) -> PolarityScores {
        PolarityScores {
            neg,
            neu,
            pos,
            compound,
        }
    }

    #[test]
    fn vader_compound_matches_python_fixture() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/vader_compound.json"
        );
        let json = std::fs::read_to_string(path).expect("read vader_compound.json");
        let fixture: serde_json::Value = serde_json::from_str(&json).expect("parse fixture");
        let cases = fixture["cases"].as_array().expect("fixture has cases");
        assert!(!cases.is_empty(), "fixture has no cases");
        let mut mismatches = Vec::new();
        for case in cases {
            let text = case["text"].as_str().expect("case text");
            let expected = case["compound"].as_f64().expect("case compound");
            let got = compound(text);
            if (got - expected).abs() > 1e-4 {
                mismatches.push((text.to_string(), expected, got));
            }
        }
        assert!(
            mismatches.is_empty(),
            "{} of {} fixture cases differ from vaderSentiment 3.3.2 (text, expected, got): {:?}",
            mismatches.len(),
            cases.len(),
            &mismatches[..mismatches.len().min(10)]
        );
    }

    /// Full `polarity_scores` dictionaries from vaderSentiment 3.3.2 (the package's own
    /// demo sentences and a few edge cases), compared exactly: rounding gives equal doubles.
    #[test]
    fn polarity_scores_match_python_exactly() {
        let cases: &[(&str, f64, f64, f64, f64)] = &[
            ("VADER is smart, handsome, and funny.", 0.0, 0.254, 0.746, 0.8316),
            ("VADER is smart, handsome, and funny!", 0.0, 0.248, 0.752, 0.8439),
            ("VADER is very smart, handsome, and funny.", 0.0, 0.299, 0.701, 0.8545),
            ("VADER is VERY SMART, handsome, and FUNNY.", 0.0, 0.246, 0.754, 0.9227),
            ("VADER is VERY SMART, handsome, and FUNNY!!!", 0.0, 0.233, 0.767, 0.9342),
            ("VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!", 0.0, 0.294, 0.706, 0.9469),
            ("VADER is not smart, handsome, nor funny.", 0.646, 0.354, 0.0, -0.7424),
            ("The book was good.", 0.0, 0.508, 0.492, 0.4404),
            ("At least it isn't a horrible book.", 0.0, 0.678, 0.322, 0.431),
            ("The book was only kind of good.", 0.0, 0.697, 0.303, 0.3832),
            (
                "The plot was good, but the characters are uncompelling and the dialog is not great.",
                0.327,
                0.579,
                0.094,
                -0.7042,
            ),
            ("Today SUX!", 0.779, 0.221, 0.0, -0.5461),
            ("Today only kinda sux! But I'll get by, lol", 0.127, 0.556, 0.317, 0.5249),
            ("Make sure you :) or :D today!", 0.0, 0.294, 0.706, 0.8633),
            ("Catch utf-8 emoji such as 💘 and 💋 and 😁", 0.0, 0.583, 0.417, 0.875),
            ("Not bad at all", 0.0, 0.513, 0.487, 0.431),
            ("Sentiment analysis has never been this good!", 0.0, 0.621, 0.379, 0.5672),
            ("With VADER, sentiment analysis is the shit!", 0.0, 0.583, 0.417, 0.6476),
            ("On the other hand, VADER is quite bad ass", 0.0, 0.423, 0.577, 0.802),
            (
                "Roger Dodger is one of the least compelling variations on this theme.",
                0.132,
                0.868,
                0.0,
                -0.1695,
            ),
            ("Without a doubt, excellent idea.", 0.0, 0.341, 0.659, 0.7013),
            ("Is it good??", 0.0, 0.38, 0.62, 0.504),
            ("NO good", 1.0, 0.0, 0.0, -0.4835),
            ("no no good", 0.454, 0.189, 0.357, -0.1326),
        ];
        for &(text, neg, neu, pos, compound) in cases {
            assert_eq!(
                polarity_scores(text),
                scores(neg, neu, pos, compound),
                "{text:?}"
            );
        }
    }

    #[test]
    fn empty_text_scores_all_zero() {
        // Python returns all four as 0.0 (neu too) when there is no word.
        for text in ["", " \t ", "\u{1c}\n"] {
            assert_eq!(polarity_scores(text), PolarityScores::default(), "{text:?}");
        }
        // One neutral word is fully neutral.
        assert_eq!(polarity_scores("hello"), scores(0.0, 1.0, 0.0, 0.0));
    }

    #[test]
    fn negation_flips_sign() {
        assert_eq!(compound("The movie was good."), 0.4404);
        assert_eq!(compound("The movie was not good."), -0.3412);
        assert!(compound("It isn't bad.") > 0.0);
    }

    #[test]
    fn exclamation_raises_score() {
        assert_eq!(compound("good"), 0.4404);
        assert_eq!(compound("good!"), 0.4926);
        // Capped at four exclamation points.
        assert_eq!(compound("good!!!!!!"), 0.6209);
        assert_eq!(compound("good!!!!"), compound("good!!!!!!"));
    }

    #[test]
    fn all_caps_emphasis_only_when_some_words_are_caps() {
        assert_eq!(compound("The movie was GOOD."), 0.5622);
        // Everything in caps: no cap differential, no emphasis.
        assert_eq!(
            compound("THE MOVIE WAS GOOD."),
            compound("The movie was good.")
        );
    }

    #[test]
    fn python_string_semantics() {
        assert!(py_isupper("GOOD"));
        assert!(py_isupper("A1!"));
        assert!(py_isupper("ÀÉ"));
        assert!(!py_isupper("123"));
        assert!(!py_isupper(":)"));
        assert!(!py_isupper("Good"));
        assert!(!py_isupper("A\u{1C5}")); // titlecase letter
        assert!(!py_isupper("AB\u{AA}")); // ª is Lowercase (Other_Lowercase)
        assert_eq!(
            py_split("a\u{1c}b\u{a0}c\u{3000} d ").collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(py_strip("\u{1f} x \u{85}"), "x");
        assert_eq!(SentiText::strip_punc_if_word(":)"), ":)");
        assert_eq!(SentiText::strip_punc_if_word("'good!'"), "good");
        assert_eq!(SentiText::strip_punc_if_word("(ok)"), "(ok)");
        assert_eq!(SentiText::strip_punc_if_word("«élan»"), "«élan»");
        assert_eq!(SentiText::strip_punc_if_word("«ok»"), "«ok»");
        assert_eq!(py_lower("ÉCOLE"), "école");
    }

    #[test]
    fn round_is_pythons() {
        // round(0.03125, 4), round(0.0625, 3), round(0.09375, 4): exact binary ties go to even.
        assert_eq!(py_round(0.03125, 4), 0.0312);
        assert_eq!(py_round(0.09375, 4), 0.0938);
        assert_eq!(py_round(0.0625, 3), 0.062);
        assert_eq!(py_round(-0.03125, 4), -0.0312);
        // 0.12345 is really 0.123450000000000004174438572..., so it rounds up.
        assert_eq!(py_round(0.12345, 4), 0.1235);
        // 2.675 is really 2.67499999999999982236431605997495353221893310546875.
        assert_eq!(py_round(2.675, 2), 2.67);
        let tiny = py_round(-0.00001, 4);
        assert!(tiny == 0.0 && tiny.is_sign_negative());
    }

    #[test]
    fn lexicons_parse_like_python() {
        let analyzer = SentimentIntensityAnalyzer::get();
        // len(SentimentIntensityAnalyzer().lexicon) and len(....emojis) in Python.
        assert_eq!(analyzer.lexicon.len(), 7506);
        assert_eq!(analyzer.emojis.len(), 3570);
        assert_eq!(analyzer.lexicon.get("good"), Some(&1.9));
        assert_eq!(analyzer.lexicon.get("no"), Some(&-1.2));
        assert_eq!(analyzer.lexicon.get(":("), Some(&-1.9));
        assert_eq!(
            analyzer.emojis.get("😁"),
            Some(&"beaming face with smiling eyes")
        );
        // `polarity_scores` skips the emoji lookup for ASCII characters.
        assert!(analyzer.emojis.keys().all(|k| !k.is_ascii()));
    }

    /// The indexed `but_check` against a literal transcription of the Python loop.
    #[test]
    fn but_check_matches_python_loop() {
        fn python_but_check(words_lower: &[Cow<str>], mut sentiments: Vec<f64>) -> Vec<f64> {
            if let Some(bi) = words_lower.iter().position(|w| w == "but") {
                for k in 0..sentiments.len() {
                    let sentiment = sentiments[k];
                    let si = sentiments.iter().position(|&x| x == sentiment).unwrap();
                    if si < bi {
                        sentiments[si] = sentiment * 0.5;
                    } else if si > bi {
                        sentiments[si] = sentiment * 1.5;
                    }
                }
            }
            sentiments
        }
        let values = [0.0, -0.0, 1.0, 0.5, 2.0, -1.0, 0.75, 1.5, 3.0, -2.0];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 1 + (state >> 60) as usize;
            let bi = (state >> 32) as usize % n;
            let words: Vec<Cow<str>> = (0..n)
                .map(|j| Cow::Borrowed(if j == bi { "but" } else { "w" }))
                .collect();
            let sentiments: Vec<f64> = (0..n)
                .map(|j| values[((state >> (j % 20)) as usize + j) % values.len()])
                .collect();
            let got = but_check(&words, sentiments.clone());
            let want = python_but_check(&words, sentiments);
            let bits = |v: &[f64]| v.iter().map(|x| (x + 0.0).to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want));
        }
    }
}
