"""Offline multilingual data (Bible corpus and genre task, FreeDict lexicons), file loaders,
online ``datasets`` loaders and tokenisation helpers."""
from xlt_fast.data.bible import (GENRES, HALVES, SPLITS, get_translation, languages, load_genre_task,
                                 load_parallel, load_verses, subsample_with_priors, translations)
from xlt_fast.data.core import ClassificationDataset, PairDataset, TokenDataset
from xlt_fast.data.formats import (convert_tags, load_classification_file, load_conll_ner,
                                   load_marc, load_pair_file, load_wikiann, load_xnli, read_bitext,
                                   read_conll, write_conll)
from xlt_fast.data.lexicons import load_lexicon
from xlt_fast.data.priors import peaked_prior, prior_name, resolve_priors
from xlt_fast.data.tokenization import (IGNORE_INDEX, pool_subwords, tokenize_and_align_labels,
                                        tokenize_words)

__all__ = ["ClassificationDataset", "GENRES", "HALVES", "IGNORE_INDEX", "PairDataset", "SPLITS",
           "TokenDataset", "convert_tags", "get_translation", "languages",
           "load_classification_file", "load_conll_ner", "load_genre_task", "load_lexicon",
           "load_marc", "load_pair_file", "load_parallel", "load_verses", "load_wikiann",
           "load_xnli", "peaked_prior", "pool_subwords", "prior_name", "read_bitext", "read_conll", "resolve_priors", "subsample_with_priors",
           "tokenize_and_align_labels", "tokenize_words", "translations", "write_conll"]
