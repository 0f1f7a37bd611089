#!/usr/bin/env bash
# Regenerates the sample voice notes: espeak-ng speech (Debian packages espeak-ng and sox),
# 16 kHz mono, in several voices and in WAV, FLAC and Ogg Vorbis. Generated audio, no
# third-party recordings: free to use and redistribute.
set -euo pipefail
cd "$(dirname "$0")"
gen() { espeak-ng -v "$2" -s 160 -w /tmp/omniembed-clip.wav "$3" && sox /tmp/omniembed-clip.wav -r 16000 -c 1 "$1"; }
gen headphones.wav "en-us+m3" "These headphones cancel the noise on a long flight, and the battery lasts two days."
gen earbuds.flac "en-gb+f2" "The earbuds fit well when I run, and the case charges them three times."
gen kettle.flac "en-us+f4" "The kettle boils a full litre in under four minutes and switches off by itself."
gen grinder.wav "en-gb+m7" "The burr grinder is loud, but the grind is even for espresso and for pour over."
gen tent.flac "en-us+m3" "We pitched the tent in the rain in five minutes and stayed dry all night."
gen keyboard.ogg "en-gb+f2" "The mechanical keyboard has quiet switches and a detachable cable."
rm -f /tmp/omniembed-clip.wav
