-- Features that drive a class (actstore effects): per (model, class, feature), the summed attribution of the
-- feature over the samples it fired on (to the log-probability of each sample's predicted class, to the true
-- label's margin, or to the class logit, as the effects were computed; for a decoder LM to the next-token loss),
-- its mean per sample and the samples it fired on; the top n per class by summed attribution (or for one class).
-- @param sae VARCHAR: SAE name (its effects: actstore effects STORE --sae NAME)
-- @param class VARCHAR = NULL: only this class (default: every class)
-- @param model VARCHAR = NULL: only the effects on this model (default: every model the SAE was spliced into)
-- @param n INTEGER = 10: features per class
SELECT
    model,
    layer,
    class,
    row_number() OVER (PARTITION BY model, class ORDER BY sum(attribution) DESC, feature) AS rank,
    feature,
    sum(attribution) AS attribution,
    avg(attribution) AS mean_attribution,
    count(*) AS n_samples
FROM feature_effects
WHERE sae = $sae AND ($class IS NULL OR class = $class) AND ($model IS NULL OR model = $model)
GROUP BY model, layer, class, feature
QUALIFY rank <= $n
ORDER BY model, class, rank
